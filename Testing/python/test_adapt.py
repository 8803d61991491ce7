"""Few-shot adaptation (issue 24, item 1): learning, the adapter file, screening with it, the CLI.

A toy cohort of synthetic CTs (a dense blob = "Lung nodule") and the tiny model keep every
test to seconds; the encoders are real, only their size is small.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medalign.core.errors import CheckpointError, InputError

FINDINGS = ["Lung nodule", "Cardiomegaly"]


def _toy_cohort(folder: Path, n: int = 8) -> Path:
    """``n`` synthetic CTs: even ones carry a dense ball in the right lung (Lung nodule
    present), Cardiomegaly positives (alternating in pairs) a soft-tissue slab between the
    lungs, so both findings have positives and negatives that even a random encoder sees."""
    from helpers import synthetic_ct

    from medalign.core.volume_io import write_volume

    (folder / "volumes").mkdir(parents=True)
    rows = []
    for i in range(n):
        nodule, cardio = int(i % 2 == 0), int((i // 2) % 2 == 0)
        vol = synthetic_ct(seed=i)
        k, j, ii = np.ogrid[: vol.array.shape[0], : vol.array.shape[1], : vol.array.shape[2]]
        if nodule:
            vol.array[(k - 20) ** 2 + (j - 32) ** 2 + (ii - 45) ** 2 < 36] = 400
        if cardio:
            vol.array[10:30, 22:42, 26:38] = 60
        write_volume(vol, folder / "volumes" / f"case{i}.nii.gz")
        rows.append([f"case{i}.nii.gz", nodule, cardio])
    with (folder / "labels.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([["VolumeName", *FINDINGS], *rows])
    return folder


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return _toy_cohort(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def learned(toy):
    """(model, its state before, AdaptResult) of a 2-shot run on the toy cohort."""
    from helpers import tiny_test_model

    from medalign.training.adapt import adapt

    model = tiny_test_model(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    result = adapt(toy, 2, model=model, findings=FINDINGS, epochs=40, device="cpu", progress=False)
    return model, before, flags, result


# ---------------------------------------------------------------------- learning
def test_adapting_lowers_the_loss_and_changes_only_the_adapter(learned):
    model, before, flags, result = learned
    assert result.losses[-1] < result.losses[0] - 0.05  # a random tiny encoder leaves little to separate
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags  # the freeze is undone
    assert all(p.grad is None for p in model.parameters())
    assert result.adapter.tensors["context"].abs().sum() > 0  # the adapter did learn


def test_an_untrained_adapter_reproduces_the_zero_shot_latents():
    """Design rule: context 0 and merge query 0 (uniform attention) give the knowledge
    ensemble exactly, so adaptation starts from zero-shot, not from a random prompt."""
    from medalign.training.prompt_adapter import PromptAdapter

    g = torch.Generator().manual_seed(0)
    anchors = torch.nn.functional.normalize(torch.randn(3, 2, 16, generator=g), dim=-1)
    descriptors = [(torch.randn(5 + f, 16, generator=g), torch.randn(3, 16, generator=g)) for f in range(3)]
    adapter = PromptAdapter(anchors, descriptors)
    assert torch.allclose(adapter(), anchors, atol=1e-6)
    with torch.no_grad():
        adapter.merge_query.normal_()
    assert not torch.allclose(adapter(), anchors, atol=1e-3)


def test_each_finding_trains_on_exactly_k_cases_with_and_k_without():
    from medalign.training.adapt import sample_shots

    labels = torch.tensor(np.random.default_rng(1).integers(0, 2, size=(40, 3)))
    chosen, mask = sample_shots(labels, 4, seed=7, findings=["a", "b", "c"])
    picked = labels[chosen]
    for j in range(3):
        assert int((picked[mask[:, j], j] == 1).sum()) == 4 and int((picked[mask[:, j], j] == 0).sum()) == 4
    assert len(chosen) < 24  # cases drawn for one finding serve the next
    assert sample_shots(labels, 4, seed=7, findings=["a", "b", "c"])[0] == chosen  # the seed decides
    with pytest.raises(InputError, match="too few for b"):
        sample_shots(torch.stack([labels[:, 0], torch.ones(40, dtype=torch.long)], 1), 2, 0, ["a", "b"])


def test_optimal_transport_term_has_gradients_for_the_prompts(learned):
    """The OT alignment (POT, batched entropic Sinkhorn) is differentiable w.r.t. the context."""
    from medalign.training.prompt_adapter import PromptAdapter, ot_logits

    g = torch.Generator().manual_seed(0)
    anchors = torch.nn.functional.normalize(torch.randn(2, 2, 8, generator=g), dim=-1)
    adapter = PromptAdapter(anchors, [(torch.randn(4, 8, generator=g), torch.randn(2, 8, generator=g))] * 2)
    tokens = torch.nn.functional.normalize(torch.randn(3, 10, 8, generator=g), dim=-1)
    scores = ot_logits(adapter, tokens, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    scores.sum().backward()
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert adapter.context.grad is not None and adapter.context.grad.abs().sum() > 0


# ---------------------------------------------------------------------- the file
def test_adapter_file_round_trips(learned, tmp_path):
    from medalign.inference.adapter import read_adapter, read_adapter_header, save_adapter

    adapter = learned[3].adapter
    back = read_adapter(save_adapter(adapter, tmp_path / "a.safetensors"))
    assert back.metadata() == json.loads(json.dumps(adapter.metadata()))
    assert torch.equal(back.class_latents, adapter.class_latents.float())
    assert back.findings == FINDINGS and back.shots == 2 and back.method == "vip+kmat"
    assert back.calibration.of("Lung nodule").threshold == adapter.calibration.of("Lung nodule").threshold
    header = read_adapter_header(tmp_path / "a.safetensors")  # what a file picker reads: no tensors
    assert header.metadata() == back.metadata() and header.tensors == {}


def test_an_adapter_for_another_model_is_refused_in_one_sentence(learned, tmp_path):
    from helpers import tiny_test_model

    from medalign.inference.adapter import save_adapter
    from medalign.inference.screener import Screener

    path = save_adapter(learned[3].adapter, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError) as err:
        Screener(model=tiny_test_model(seed=1), findings=FINDINGS, device="cpu", adapter=path)
    message = str(err.value)
    assert "trained for model 'medalign'" in message and "not for 'medalign'" in message
    assert learned[3].adapter.model_sha256[:12] in message and "\n" not in message


def test_a_registry_model_mismatch_is_refused_before_the_model_loads(learned, tmp_path):
    from dataclasses import replace

    from medalign.inference import screener as screening
    from medalign.inference.adapter import save_adapter

    foreign = replace(learned[3].adapter, model="ct-clip", model_sha256="ab" * 32, registered=True)
    path = save_adapter(foreign, tmp_path / "ctclip.safetensors")
    screening._MODEL_CACHE.clear()
    with pytest.raises(CheckpointError, match=r"trained for model 'ct-clip' .* not for 'medalign-demo'"):
        screening.Screener(model="medalign-demo", findings=FINDINGS, device="cpu", adapter=path)
    assert not screening._MODEL_CACHE  # refused from the registry's SHA-256, nothing was loaded


@pytest.mark.parametrize("damage", ["random bytes", "truncated", "foreign safetensors", "bad shapes", "newer version"])
def test_a_corrupt_or_foreign_adapter_file_is_one_sentence(learned, tmp_path, damage):
    from dataclasses import replace

    from safetensors.torch import save_file

    from medalign.inference.adapter import read_adapter, read_adapter_header, save_adapter

    path = tmp_path / "a.safetensors"
    good = save_adapter(learned[3].adapter, tmp_path / "good.safetensors").read_bytes()
    if damage == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(500))
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "foreign safetensors":
        save_file({"weight": torch.zeros(3)}, str(path))
    elif damage == "bad shapes":
        tensors = dict(learned[3].adapter.tensors, class_latents=torch.zeros(5, 2, 4))
        save_adapter(replace(learned[3].adapter), path)
        save_file(tensors, str(path), metadata={"medalign_adapter": json.dumps(learned[3].adapter.metadata())})
    else:
        meta = dict(learned[3].adapter.metadata(), version=99)
        save_file(dict(learned[3].adapter.tensors), str(path), metadata={"medalign_adapter": json.dumps(meta)})
    with pytest.raises(CheckpointError) as err:
        read_adapter(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_adapter(tmp_path / "missing.safetensors")
    if damage not in ("bad shapes", "truncated"):  # the header alone cannot see damaged tensor data
        with pytest.raises(CheckpointError) as header_err:
            read_adapter_header(path)
        assert str(header_err.value).split(" (")[0] == str(err.value).split(" (")[0]  # the reader's error type aside


# ---------------------------------------------------------------------- screening with it
def test_screening_with_an_adapter_changes_only_the_adapted_findings(learned):
    from dataclasses import replace

    from helpers import synthetic_ct

    from medalign.inference.screener import Screener

    model, _, _, result = learned
    only_nodule = replace(result.adapter, findings=["Lung nodule"], tensors={"class_latents": result.adapter.class_latents[:1]})
    volume = synthetic_ct(seed=11, blob_ras=(20.0, 10.0, 0.0))
    plain = Screener(model=model, findings=FINDINGS, device="cpu")(volume)
    adapted_screener = Screener(model=model, findings=FINDINGS, device="cpu", adapter=only_nodule)
    adapted = adapted_screener(volume)
    assert adapted.finding("Lung nodule").probability != pytest.approx(plain.finding("Lung nodule").probability, abs=1e-4)
    assert adapted.finding("Cardiomegaly").probability == pytest.approx(plain.finding("Cardiomegaly").probability, abs=1e-6)
    assert adapted.finding("Lung nodule").threshold == only_nodule.calibration.of("Lung nodule").threshold
    corners = np.array([[0, 0, 0], [n - 1 for n in volume.shape_ijk]])
    for f in adapted.findings:  # maps still come out on the input grid (its extent, at map spacing)
        last = [[n - 1 for n in f.map.shape_ijk]]
        assert np.allclose(f.map.ijk_to_ras_points(np.array([[0, 0, 0], *last])), volume.ijk_to_ras_points(corners), atol=1e-3)
    assert not np.allclose(adapted.finding("Lung nodule").map.array, plain.finding("Lung nodule").map.array)


def test_the_public_screen_call_takes_an_adapter(learned, tmp_path):
    from helpers import synthetic_ct

    import medalign
    from medalign.inference.adapter import save_adapter

    model, _, _, result = learned
    path = save_adapter(result.adapter, tmp_path / "a.safetensors")
    volume = synthetic_ct(seed=12)
    with_adapter = medalign.screen(volume, findings=["Lung nodule"], model=model, device="cpu", adapter=path, with_maps=False)
    without = medalign.screen(volume, findings=["Lung nodule"], model=model, device="cpu", with_maps=False)
    assert with_adapter.findings[0].probability != pytest.approx(without.findings[0].probability, abs=1e-4)


# ---------------------------------------------------------------------- command line
def test_adapt_command_end_to_end_on_phantoms_then_screen_with_the_adapter(tiny_model, tmp_path, capsys):
    from medalign.cli import main
    from medalign.cli.adapt import METHODS as CLI_METHODS
    from medalign.inference.adapter import METHODS, read_adapter

    assert CLI_METHODS == METHODS
    cohort = tmp_path / "phantoms"
    assert main(["phantoms", "--out", str(cohort), "--n", "4", "--seed", "2", "--prevalence", "0.5",
                 "--findings", "Lung nodule;Pleural effusion", "--workers", "1"]) == 0
    labels = list(csv.DictReader((cohort / "labels.csv").open()))
    assert {r["Lung nodule"] for r in labels} == {"0", "1"} and {r["Pleural effusion"] for r in labels} == {"0", "1"}
    out = tmp_path / "adapter.safetensors"
    assert main(["adapt", "--data", str(cohort), "--shots", "1", "--out", str(out), "--model", tiny_model,
                 "--findings", "Lung nodule;Pleural effusion", "--epochs", "5", "--device", "cpu"]) == 0
    adapter = read_adapter(out)
    assert adapter.model == tiny_model and adapter.registered and adapter.shots == 1
    assert "adapted 2 findings of tiny" in capsys.readouterr().out
    screened = tmp_path / "screened"
    ct = next((cohort / "volumes").iterdir())
    assert main(["screen", str(ct), "--out", str(screened), "--adapter", str(out), "--device", "cpu",
                 "--findings", "Lung nodule;Emphysema", "--no-maps"]) == 0  # the model comes from the adapter
    data = json.loads((screened / "results.json").read_text())
    assert data["model"] == tiny_model and data["settings"]["adapter"]["path"] == str(out)


def test_adapt_command_refuses_bad_input_in_one_line(tiny_model, toy, tmp_path, capsys):
    from medalign.cli import main

    assert main(["adapt", "--data", str(toy), "--shots", "9", "--out", str(tmp_path / "a.safetensors"),
                 "--model", tiny_model, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medalign: error: 9 shots need 9 labelled cases") and "\n" not in err
    assert not (tmp_path / "a.safetensors").exists()
    (tmp_path / "garbage.safetensors").write_bytes(b"not an adapter")
    assert main(["screen", str(next((toy / "volumes").iterdir())), "--out", str(tmp_path / "o"),
                 "--adapter", str(tmp_path / "garbage.safetensors"), "--device", "cpu"]) == 2
    assert "is not a medalign adapter" in capsys.readouterr().err


# ---------------------------------------------------------------------- calibrating with it
def _registered(learned, tiny_model: str, tmp_path: Path) -> Path:
    """The toy adapter, re-labelled for registry model ``tiny_model`` (the same seed-0 weights
    ``helpers.tiny_checkpoint`` registers), saved to a file."""
    from dataclasses import replace

    from medalign.inference.adapter import save_adapter
    from medalign.models import registry

    adapter = replace(learned[3].adapter, model=tiny_model, model_sha256=registry.get(tiny_model).sha256, registered=True)
    return save_adapter(adapter, tmp_path / "site.safetensors")


def test_calibrate_with_an_adapter_stores_the_fit_in_the_adapter_and_screening_reports_it(
        learned, toy, tiny_model, tmp_path, capsys):
    from medalign.cli import main
    from medalign.inference.adapter import read_adapter
    from medalign.models import registry

    path = _registered(learned, tiny_model, tmp_path)
    before = read_adapter(path)
    assert main(["calibrate", "--data", str(toy), "--adapter", str(path), "--findings", "lung  NODULE",
                 "--device", "cpu"]) == 0
    assert f"wrote the adapter's calibration into {path}" in capsys.readouterr().out
    after = read_adapter(path)
    nodule, old = after.calibration.of("Lung nodule"), before.calibration.of("Lung nodule")
    assert (nodule.temperature, nodule.bias) != (old.temperature, old.bias)
    assert nodule.heldout_auc == old.heldout_auc and after.calibration.fitted_on == str(toy.resolve())
    assert after.calibration.of("Cardiomegaly") == before.calibration.of("Cardiomegaly")  # merged, not replaced
    assert torch.equal(after.class_latents, before.class_latents) and after.metadata()["shots"] == before.shots
    assert not (registry.cache_dir() / "calibration" / f"{tiny_model}.json").exists()  # the model's stays as it was
    assert list(tmp_path.glob("*.tmp*")) == []

    out = tmp_path / "screened"  # screening with the adapter reports its calibrated probability
    assert main(["screen", str(toy / "volumes" / "case1.nii.gz"), "--out", str(out), "--adapter", str(path),
                 "--findings", "Lung nodule", "--device", "cpu", "--no-maps"]) == 0
    row = json.loads((out / "results.json").read_text())["findings"][0]
    assert row["probability"] == pytest.approx(nodule.probability(row["score"]), abs=1e-5)
    assert row["probability"] != pytest.approx(old.probability(row["score"]), abs=1e-4)


def test_calibrate_refuses_a_foreign_adapter_or_an_unadapted_finding_before_any_work(learned, toy, tiny_model,
                                                                                     tmp_path, capsys):
    from dataclasses import replace

    from helpers import assert_one_sentence

    from medalign.cli import main
    from medalign.inference import screener as screening
    from medalign.inference.adapter import save_adapter

    foreign = save_adapter(replace(learned[3].adapter, model="ct-clip", model_sha256="ab" * 32, registered=True),
                           tmp_path / "ctclip.safetensors")
    content = foreign.read_bytes()
    screening._MODEL_CACHE.clear()
    assert main(["calibrate", "--data", str(toy), "--adapter", str(foreign), "--model", tiny_model,
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().removeprefix("medalign: error: ")
    assert_one_sentence(CheckpointError(err), "trained for model 'ct-clip'", f"not for '{tiny_model}'", str(foreign))
    assert foreign.read_bytes() == content and not screening._MODEL_CACHE  # nothing loaded, nothing written

    path = _registered(learned, tiny_model, tmp_path)
    content = path.read_bytes()
    assert main(["calibrate", "--data", str(toy), "--adapter", str(path), "--findings", "Lung nodule;Emphysema",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().removeprefix("medalign: error: ")
    assert_one_sentence(InputError(err), "does not adapt 'Emphysema'", "without --adapter")
    assert path.read_bytes() == content and not screening._MODEL_CACHE
