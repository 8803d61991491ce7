"""A short training run on a synthetic cohort lowers the loss; eval writes its metrics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import synthetic_ct

from medalign.core.volume_io import write_volume
from medalign.knowledge.findings import CT_RATE_FINDINGS


def _cohort(root, n=8):
    """Half the cases carry a dense blob ("Lung nodule"), with matching reports and masks."""
    (root / "volumes").mkdir(parents=True)
    (root / "masks").mkdir()
    reports, labels = [], []
    bit = 1 << CT_RATE_FINDINGS.index("Lung nodule")
    for i in range(n):
        positive = i % 2 == 0
        vol = synthetic_ct(seed=i, blob_ras=(40.0, 20.0, 10.0) if positive else None)
        write_volume(vol, root / "volumes" / f"c{i}.nii.gz")
        mask = vol.__class__((vol.array > 200).astype(np.int32) * bit, vol.ijk_to_ras)
        write_volume(mask, root / "masks" / f"c{i}.nii.gz")
        reports.append({"VolumeName": f"c{i}.nii.gz",
                        "report_text": "A nodule in the left lung." if positive else "No nodule. Lungs are clear."})
        labels.append({"VolumeName": f"c{i}.nii.gz", "Lung nodule": int(positive), "Emphysema": 0 if i % 3 else 1})
    for name, rows in (("reports.csv", reports), ("labels.csv", labels)):
        with (root / name).open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return root


def test_short_training_lowers_loss_and_resumes(tmp_path):
    from helpers import tiny_config

    from medalign.models.medalign_model import read_checkpoint
    from medalign.training.config import TrainConfig
    from medalign.training.loop import train

    data = _cohort(tmp_path / "cohort")
    out = tmp_path / "m.safetensors"
    cfg = TrainConfig(data=data, out=out, steps=40, batch_size=4, lr=2e-3, warmup=5, device="cpu",
                      model_config=tiny_config(), save_every=20)
    train(cfg, progress=False)
    _, tensors, extra = read_checkpoint(out)
    assert extra["steps"] == 40 and set(extra["trained_findings"]) == {"Lung nodule", "Emphysema"}
    assert extra["final_loss"] < extra["initial_loss"]
    assert extra["decorrelate"] == 1.0  # the text warm-up the run used is part of its provenance
    # resume: asking for more steps continues from the saved optimizer state
    cfg.steps = 44
    train(cfg, progress=False)
    _, _, extra2 = read_checkpoint(out)
    assert extra2["steps"] == 44


def test_training_can_start_from_another_models_weights(tmp_path):
    """Fine-tuning: ``init`` loads a checkpoint's weights (text projection included, so the
    text warm-up is skipped) under a fresh optimizer; a model of another shape is refused."""
    import torch
    from helpers import tiny_config

    from medalign.core.errors import InputError
    from medalign.models.medalign_model import read_checkpoint
    from medalign.training.config import TrainConfig
    from medalign.training.loop import train

    data = _cohort(tmp_path / "cohort")
    base = tmp_path / "base.safetensors"
    train(TrainConfig(data=data, out=base, steps=6, batch_size=4, lr=2e-3, warmup=2, device="cpu",
                      model_config=tiny_config()), progress=False)
    tuned = tmp_path / "tuned.safetensors"
    logs = []
    train(TrainConfig(data=data, out=tuned, steps=2, batch_size=4, lr=0.0, warmup=1, device="cpu",
                      model_config=tiny_config(), init=base), progress=False, log=logs.append)
    assert any("starting from the weights" in line for line in logs)
    assert not any("text anchors separated" in line for line in logs)
    _, before, _ = read_checkpoint(base)
    _, after, extra = read_checkpoint(tuned)
    assert extra["steps"] == 2 and extra["init"] == str(base)  # a fresh run, and where it started
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(InputError, match="another model configuration"):
        train(TrainConfig(data=data, out=tmp_path / "x.safetensors", steps=1, batch_size=4, device="cpu", init=base),
              progress=False)


def test_cli_fine_tunes_the_embedded_demo_model_by_name(tmp_path, monkeypatch, capsys):
    """``--init medalign-demo`` resolves the registry's hash-checked weights; at learning rate 0
    the result is the demo model's weights. Unknown or non-medalign models are one sentence."""
    import torch

    from medalign.cli import main
    from medalign.models.medalign_model import read_checkpoint
    from medalign.models.registry import get, resolve_weights

    monkeypatch.setenv("MEDALIGN_HOME", str(tmp_path / "home"))
    data = _cohort(tmp_path / "cohort", n=4)
    out = tmp_path / "tuned.safetensors"
    args = ["train", "--data", str(data), "--out", str(out), "--steps", "1", "--batch-size", "2", "--lr", "0",
            "--device", "cpu", "--workers", "1"]
    assert main(args + ["--init", "medalign-demo"]) == 0
    _, demo, _ = read_checkpoint(resolve_weights(get("medalign-demo")))
    _, tuned, extra = read_checkpoint(out)
    assert extra["init"].endswith("model.safetensors")
    assert all(torch.equal(demo[k], tuned[k]) for k in demo)
    capsys.readouterr()
    for name, phrase in (("no-such-model", "Unknown model"), ("ct-clip", "medalign-family")):
        fresh = tmp_path / f"{name}.safetensors"
        assert main(args[:3] + ["--out", str(fresh)] + args[5:] + ["--init", name]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and phrase in err[0] and not fresh.exists()


def test_deeper_local_path_trains_in_mixed_precision_and_reloads(tmp_path):
    """``local_blocks`` adds residual convolutions on the 16 mm local path; ``bf16`` runs the
    forward and losses under autocast while weights and checkpoint stay float32."""
    import dataclasses

    import torch
    from helpers import tiny_config

    from medalign.models.medalign_model import load_checkpoint, read_checkpoint
    from medalign.training.config import TrainConfig
    from medalign.training.loop import train

    data = _cohort(tmp_path / "cohort")
    out = tmp_path / "deep.safetensors"
    train(TrainConfig(data=data, out=out, steps=30, batch_size=4, lr=2e-3, warmup=5, device="cpu", precision="bf16",
                      model_config=dataclasses.replace(tiny_config(), local_blocks=2)), progress=False)
    cfg, tensors, extra = read_checkpoint(out)
    assert cfg.local_blocks == 2 and extra["precision"] == "bf16"
    assert any(k.startswith("local_path.1.") for k in tensors)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert extra["final_loss"] < extra["initial_loss"]
    model = load_checkpoint(out)
    assert len(model.local_path) == 2
    from medalign.core.errors import InputError

    with pytest.raises(InputError, match="float32 or bf16"):  # fp16 would need loss scaling
        train(TrainConfig(data=data, out=tmp_path / "half.safetensors", steps=1, device="cpu", precision="fp16",
                          model_config=tiny_config()), progress=False)
    assert not (tmp_path / "half.safetensors").exists()


def test_cli_model_size_flags(tmp_path, monkeypatch, capsys):
    """New models take --local-blocks/--vit-depth; --init keeps its weights' size, so a size flag
    beside it, or an impossible size, is one sentence with nothing written."""
    from medalign.cli import main
    from medalign.models.medalign_model import read_checkpoint
    from medalign.models.registry import get, resolve_weights

    monkeypatch.setenv("MEDALIGN_HOME", str(tmp_path / "home"))
    assert read_checkpoint(resolve_weights(get("medalign-demo")))[0].local_blocks == 0  # written before the option
    data = _cohort(tmp_path / "cohort", n=4)
    args = ["train", "--data", str(data), "--steps", "1", "--batch-size", "2", "--device", "cpu", "--workers", "1"]
    out = tmp_path / "sized.safetensors"
    assert main(args + ["--out", str(out), "--local-blocks", "1", "--vit-depth", "1"]) == 0
    cfg, _, _ = read_checkpoint(out)
    assert cfg.local_blocks == 1 and cfg.vit.depth == 1
    # continuing the run takes its size without the flags; another size is refused before any work
    assert main(args[:4] + ["2"] + args[5:] + ["--out", str(out)]) == 0
    cfg, _, extra = read_checkpoint(out)
    assert cfg.local_blocks == 1 and extra["steps"] == 2
    capsys.readouterr()
    assert main(args[:4] + ["3"] + args[5:] + ["--out", str(out), "--local-blocks", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another model configuration" in err[0] and "--no-resume" in err[0]
    assert read_checkpoint(out)[2]["steps"] == 2
    for extra, phrase in ((["--init", "medalign-demo", "--local-blocks", "2"], "fixes the model size"),
                          (["--vit-depth", "0"], "at least 1"), (["--local-blocks", "-1"], "0 or more")):
        fresh = tmp_path / "refused.safetensors"
        assert main(args + ["--out", str(fresh)] + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and phrase in err[0] and not fresh.exists()


def test_eval_writes_metrics_roc_and_localization(tmp_path):
    from helpers import tiny_test_model

    from medalign.evaluation.evaluate import evaluate

    data = _cohort(tmp_path / "cohort", n=6)
    summary = evaluate(data, tmp_path / "eval", model=tiny_test_model(), findings=["Lung nodule"], device="cpu",
                       n_boot=50, progress=False)
    e = summary["findings"]["Lung nodule"]
    assert e["n"] == 6 and e["positives"] == 3
    assert 0.0 <= e["auc"]["value"] <= 1.0 and e["auc"]["ci_low"] <= e["auc"]["ci_high"]
    assert e["localized_cases"] == 3 and 0.0 <= e["pointing_game"] <= e["pointing_game_tolerant"] <= 1.0
    for name in ("metrics.json", "metrics.csv", "predictions.csv", "roc.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["cases"] == 6


def test_eval_reports_calibration_and_draws_a_reliability_diagram(tmp_path):
    """ECE (10 equal-width bins) per finding and macro, the uncertainty's AUROC for wrong vs
    right, NLL, and reliability.png; the ECE is recomputed here from predictions.csv."""
    from helpers import tiny_test_model

    from medalign.evaluation.calibration import expected_calibration_error
    from medalign.evaluation.evaluate import evaluate

    data = _cohort(tmp_path / "cohort", n=6)
    summary = evaluate(data, tmp_path / "eval", model=tiny_test_model(), findings=["Lung nodule", "Emphysema"],
                       device="cpu", n_boot=0, progress=False, tta=1)
    assert summary["ece_bins"] == 10 and summary["tta"] == 1
    rows = list(csv.DictReader((tmp_path / "eval" / "predictions.csv").open()))
    for name in ("Lung nodule", "Emphysema"):
        y = np.array([int(r[f"{name} (label)"]) for r in rows])
        p = np.array([float(r[f"{name} (p)"]) for r in rows])
        e = summary["findings"][name]
        assert e["ece"] == pytest.approx(expected_calibration_error(y, p), abs=1e-5)
        assert e["nll"] > 0 and e["temperature"] == 1.0
        assert all(float(r[f"{name} (uncertainty)"]) >= 0 for r in rows)
    assert summary["macro"]["ece"] == pytest.approx(np.mean([summary["findings"][n]["ece"] for n in ("Lung nodule", "Emphysema")]))
    header = (tmp_path / "eval" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"ece", "nll", "uncertainty_auroc"} <= set(header)
    png = (tmp_path / "eval" / "reliability.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_eval_shows_bootstrap_progress_and_checks_out_first(tmp_path, capsys):
    """The bootstrap ran silently for minutes after the screening bar reached 100%; a bad
    --out failed only after the whole cohort was screened."""
    from helpers import tiny_test_model

    from medalign.core.errors import OutputError
    from medalign.evaluation.evaluate import evaluate

    data = _cohort(tmp_path / "cohort", n=4)
    (tmp_path / "taken").write_text("x")
    with pytest.raises(OutputError, match="existing file"):
        evaluate(data, tmp_path / "taken", model=tiny_test_model(), findings=["Lung nodule"], device="cpu")
    assert "evaluating" not in capsys.readouterr().err  # refused before screening a case
    evaluate(data, tmp_path / "eval", model=tiny_test_model(), findings=["Lung nodule"], device="cpu", n_boot=20)
    assert "bootstrap (20 resamples)" in capsys.readouterr().err


def test_calibration_stores_thresholds_and_held_out_auc(tmp_path):
    from helpers import tiny_test_model
    from sklearn.metrics import roc_auc_score

    from medalign.core.volume_io import read_volume
    from medalign.evaluation.metrics import youden_nearest_threshold
    from medalign.inference.screener import Screener
    from medalign.models.medalign_model import load_checkpoint, save_checkpoint
    from medalign.training.calibration import calibrate

    data = _cohort(tmp_path / "cohort", n=6)
    findings = ["Lung nodule", "Emphysema"]
    path = save_checkpoint(tiny_test_model(seed=1), tmp_path / "m.safetensors", extra={"trained_findings": findings})
    calibration = calibrate(path, data, device="cpu")

    screener = Screener(model=load_checkpoint(path), findings=findings, device="cpu")
    probs = np.array([[f.probability for f in screener(read_volume(data / "volumes" / f"c{i}.nii.gz"), with_maps=False).findings]
                      for i in range(6)])
    truth = {"Lung nodule": [1, 0, 1, 0, 1, 0], "Emphysema": [1, 0, 0, 1, 0, 0]}
    for j, name in enumerate(findings):
        assert calibration[name]["auc"] == pytest.approx(roc_auc_score(truth[name], probs[:, j]), abs=1e-4)
        assert calibration[name]["threshold"] == pytest.approx(youden_nearest_threshold(truth[name], probs[:, j]), abs=1e-4)
    # the checkpoint carries both, so every front end flags the same way
    reloaded = load_checkpoint(path)
    assert {k: c.heldout_auc for k, c in reloaded.calibration.findings.items()} == {k: v["auc"] for k, v in calibration.items()}
    assert {k: c.threshold for k, c in reloaded.calibration.findings.items()} == {k: v["threshold"] for k, v in calibration.items()}


def test_training_wordings_are_disjoint_from_inference_wordings():
    """Evaluation must measure unseen prompt wordings: no training sentence for any
    finding equals any prompt the screener builds for it."""
    from medalign.knowledge.findings import build_prompts
    from medalign.models.medalign_model import PROMPT_TEMPLATES
    from medalign.training.sentences import TRAIN_TEMPLATES, finding_sentences

    assert not set(TRAIN_TEMPLATES["positive"] + TRAIN_TEMPLATES["negative"]) & set(
        PROMPT_TEMPLATES["positive"] + PROMPT_TEMPLATES["negative"])
    for finding in CT_RATE_FINDINGS:
        pos, neg = finding_sentences(finding)
        prompts = build_prompts(finding, PROMPT_TEMPLATES)
        seen = {s.lower() for s in pos + neg}
        assert not seen & {s.lower() for s in prompts.positive + prompts.negative}, finding


def test_torchrun_two_processes_train_together(tmp_path):
    """DistributedDataParallel on CPU (gloo): two ranks, one shared checkpoint."""
    import shutil
    import subprocess

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    data = _cohort(tmp_path / "cohort", n=4)
    out = tmp_path / "ddp.safetensors"
    code = (
        "import sys; from pathlib import Path; from medalign.training.config import TrainConfig; from medalign.training.loop import train; "
        f"sys.path.insert(0, r'{Path(__file__).resolve().parent}'); from helpers import tiny_config; "
        f"train(TrainConfig(data=Path(r'{data}'), out=Path(r'{out}'), steps=3, batch_size=2, device='cpu', "
        "warmup=1, model_config=tiny_config()), progress=False)"
    )
    script = tmp_path / "run_ddp.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", str(script)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from medalign.models.medalign_model import read_checkpoint

    assert read_checkpoint(out)[2]["steps"] == 3
