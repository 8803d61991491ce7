"""Screening engine on a tiny deterministic model: shapes, geometry, safety properties."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from helpers import synthetic_ct, tiny_test_model

from medalign.core.errors import CancelledError
from medalign.core.volume import Volume
from medalign.inference.results import ScreeningResult
from medalign.inference.screener import Screener, hotspot_of, parse_findings, screen
from medalign.models.calibration import Calibration, FindingCalibration


@pytest.fixture(scope="module")
def model():
    return tiny_test_model(seed=0)


def test_parse_findings_expands_groups_and_dedups():
    from medalign.knowledge.findings import CT_RATE_FINDINGS, CT_RATE_LT_FINDINGS

    assert parse_findings(None) == CT_RATE_FINDINGS
    names = parse_findings("Lung nodule; lung nodule;ct-rate-lt;a tiny free-text thing")
    assert names[0] == "Lung nodule" and names.count("Lung nodule") == 1
    assert names[1:16] == CT_RATE_LT_FINDINGS and names[-1] == "a tiny free-text thing"


def test_image_is_encoded_once_for_all_findings(model, monkeypatch):
    calls = []
    original = model.image_features
    monkeypatch.setattr(model, "image_features", lambda x: calls.append(1) or original(x))
    result = screen(synthetic_ct(), findings="ct-rate", model=model, device="cpu")
    assert len(calls) == 1
    assert len(result.findings) == 18


def test_result_values_and_map_geometry(model):
    volume = synthetic_ct()
    before = volume.array.copy()
    result = screen(volume, findings=["Lung nodule", "Pleural effusion", "a spiculated mass"], model=model, device="cpu")
    assert np.array_equal(volume.array, before)  # input never modified
    lo, hi = volume.ras_bounds()
    for f in result.findings:
        assert 0.0 <= f.probability <= 1.0 and 0.0 <= f.uncertainty <= 1.0  # entropy, bits
        assert 0.0 <= f.uncertainty_std <= 0.5
        assert isinstance(f.map, Volume) and f.map.array.dtype == np.float32
        mlo, mhi = f.map.ras_bounds()
        assert np.all(mlo >= lo - 1e-3) and np.all(mhi <= hi + 1e-3)
        # map axes point the same way as the input's
        cos = np.sum(f.map.ijk_to_ras[:3, :3] * volume.ijk_to_ras[:3, :3], axis=0)
        assert np.all(cos > 0)
        # a hotspot exactly when the map has a positive value, and then inside the scan
        assert (f.hotspot is not None) == bool(np.nanmax(f.map.array) > 0)
        if f.hotspot is not None:
            assert np.all(np.asarray(f.hotspot.ras) >= lo - 1e-3) and np.all(np.asarray(f.hotspot.ras) <= hi + 1e-3)
    # softmax over the pair: the score and the probability agree in sign
    for f in result.findings:
        assert (f.score > 0) == (f.probability > 0.5)


def test_probability_is_softmax_of_ensembled_pair(model):
    import torch

    scr = Screener(model=model, findings=["Cardiomegaly"], device="cpu")
    volume = synthetic_ct()
    result = scr(volume, with_maps=False)
    from medalign.inference.preprocess import prepare

    prepared = prepare(volume, model.profile)
    with torch.no_grad():
        feats = model.image_features(prepared.tensor)
        logits = model.logits(feats, scr.prompts[0].ensemble)[0]
    assert result.findings[0].probability == pytest.approx(float(torch.softmax(logits, 0)[0]), abs=1e-5)


def test_cancel_raises_and_returns_nothing(model):
    seen = []

    def cancel():
        seen.append(1)
        return len(seen) > 2

    with pytest.raises(CancelledError):
        screen(synthetic_ct(), findings=["Lung nodule"], model=model, device="cpu", cancel=cancel)


def test_progress_is_monotonic_and_complete(model):
    fractions = []
    screen(synthetic_ct(), findings=["Lung nodule", "Emphysema"], model=model, device="cpu",
           progress=lambda f, m: fractions.append(f))
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))


def test_gpu_oom_fallback_files_the_cached_model_under_the_device_it_sits_on(monkeypatch):
    """After an out-of-memory fallback the registry model sits on the CPU: the cache must not
    keep handing it out for CUDA requests.  CUDA is simulated (this machine may have none):
    the tiny model plays the copy cached for GPU 0, and preprocessing on "cuda" runs out of
    memory; the cache, the screener and the fallback are the real ones."""
    import torch

    from medalign.core import device as device_module
    from medalign.inference import preprocess
    from medalign.inference import screener as screener_module

    model = tiny_test_model(seed=0)
    monkeypatch.setattr(screener_module, "_MODEL_CACHE", {("tiny", "cuda:0"): model})
    monkeypatch.setattr(device_module, "resolve_device", lambda name="auto": torch.device(name))
    real_prepare = preprocess.prepare

    def prepare(volume, profile, device="cpu"):
        if torch.device(device).type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real_prepare(volume, profile, device=device)

    monkeypatch.setattr(preprocess, "prepare", prepare)
    result = Screener(model="tiny", findings=["Lung nodule"], device="cuda:0")(synthetic_ct(), with_maps=False)
    assert result.device == "cpu"
    assert screener_module._MODEL_CACHE == {("tiny", "cpu"): model}
    assert screener_module.get_model("tiny", torch.device("cpu")) == (model, "tiny")


def test_hotspot_of_known_map():
    arr = np.zeros((10, 10, 10), np.float32)
    arr[4:7, 4:7, 4:7] = 1.0
    arr[5, 5, 6] = 2.0
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    h = hotspot_of(Volume(arr, affine))
    assert h.ras == pytest.approx((12.0, 10.0, 15.0))
    assert h.value == 2.0 and h.threshold == 1.0
    assert h.extent_mm3 == pytest.approx(27 * 2 * 2 * 3)


def test_results_write_read_round_trip(model, tmp_path):
    result = screen(synthetic_ct(), findings=["Lung nodule", "Atelectasis"], model=model, device="cpu")
    out = result.write(tmp_path / "res")
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [f["name"] for f in data["findings"]] == [f.name for f in result.ranked()]
    assert (out / "results.csv").read_text(encoding="utf-8").splitlines()[0].startswith("finding,probability,uncertainty")
    back = ScreeningResult.read(out)
    for a, b in zip(result.ranked(), back.findings):
        assert a.name == b.name and a.probability == pytest.approx(b.probability, abs=1e-6)
        np.testing.assert_allclose(a.map.ijk_to_ras, b.map.ijk_to_ras, atol=1e-4)
        np.testing.assert_allclose(a.map.array, b.map.array, atol=1e-5)
    assert not list(out.rglob("*.tmp*"))


def test_near_chance_findings_are_reported_but_never_flagged(tmp_path):
    """Calibration stores each finding's held-out AUC; below MIN_FLAG_AUC a probability above the
    threshold is still shown, but the finding is not flagged in any output."""
    import io

    from medalign.cli.screen import print_table
    from medalign.inference.results import MIN_FLAG_AUC

    model = tiny_test_model(seed=0)
    model.calibration = Calibration({  # thresholds of 0: every probability clears them
        "Lung nodule": FindingCalibration(threshold=0.0, heldout_auc=MIN_FLAG_AUC - 0.01),
        "Atelectasis": FindingCalibration(threshold=0.0, heldout_auc=MIN_FLAG_AUC),
    })
    result = screen(synthetic_ct(), findings=["Lung nodule", "Atelectasis", "Emphysema"], model=model, device="cpu")
    nodule, atelectasis, emphysema = (result.finding(n) for n in ("Lung nodule", "Atelectasis", "Emphysema"))
    assert nodule.near_chance and not nodule.flagged
    assert atelectasis.flagged and not atelectasis.near_chance
    assert emphysema.validation_auc is None and not emphysema.near_chance  # never validated: threshold only
    assert emphysema.flagged == (emphysema.probability >= 0.5)

    out = result.write(tmp_path / "res")
    back = ScreeningResult.read(out, load_maps=False)
    assert back.finding("Lung nodule").validation_auc == pytest.approx(MIN_FLAG_AUC - 0.01)
    assert back.finding("Lung nodule").near_chance and not back.finding("Lung nodule").flagged
    rows = {r["finding"]: r for r in csv.DictReader(io.StringIO((out / "results.csv").read_text(encoding="utf-8")))}
    assert rows["Lung nodule"]["validation_auc"] == "0.69" and rows["Lung nodule"]["flagged"] == "0"
    assert rows["Emphysema"]["validation_auc"] == ""

    text = io.StringIO()
    print_table(result, text)
    line = next(ln for ln in text.getvalue().splitlines() if ln.startswith("Lung nodule"))
    assert " n/c " in line and "0.69" in line
    assert "never flagged" in text.getvalue()


def test_results_written_before_validation_auc_still_read(model, tmp_path):
    result = screen(synthetic_ct(), findings=["Lung nodule"], model=model, device="cpu", with_maps=False)
    data = result.to_dict()
    for f in data["findings"]:
        del f["validation_auc"]
    back = ScreeningResult.from_dict(data)
    assert back.findings[0].validation_auc is None and not back.findings[0].near_chance


def test_overlong_free_text_finding_is_one_short_sentence(tmp_path, capsys):
    """A 10,000-character finding used to end in a 30 KB error and an empty maps/ folder."""
    from medalign.cli import main
    from medalign.core.errors import InputError
    from medalign.knowledge.findings import MAX_FINDING_CHARS

    assert parse_findings(["x" * MAX_FINDING_CHARS]) == ["x" * MAX_FINDING_CHARS]
    with pytest.raises(InputError) as info:
        parse_findings("Lung nodule;" + "a very long pasted report " * 400)
    message = str(info.value)
    assert len(message) < 300 and "10399 characters" in message and f"at most {MAX_FINDING_CHARS}" in message
    from medalign.core.volume_io import write_volume

    ct = write_volume(synthetic_ct(), tmp_path / "ct.nii.gz")
    assert main(["screen", str(ct), "--out", str(tmp_path / "o"), "--device", "cpu", "--findings", "y" * 10_000]) == 2
    line = capsys.readouterr().err.strip().split("\r")[-1]  # after the progress bar's last redraw
    assert line.startswith("medalign: error: ") and len(line) < 300 and not (tmp_path / "o").exists()
