"""Calibration: Platt scaling (temperature and bias, MAP) fitted on labels, expected calibration error, the
uncertainty's power to flag wrong predictions, ``medalign calibrate``, and test-time views."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from helpers import synthetic_ct
from sklearn.metrics import roc_auc_score

from medalign.cli import main
from medalign.core.errors import InputError
from medalign.evaluation.calibrate import CohortScores, fitted_calibration
from medalign.evaluation.calibration import (
    T_BOUNDS,
    Scaling,
    expected_calibration_error,
    fit_scaling,
    fit_scalings,
    nll,
    reliability_bins,
    uncertainty_auroc,
)
from medalign.inference.results import FindingResult, ScreeningResult
from medalign.inference.uncertainty import (
    TTA_SHIFT_MM,
    binary_entropy_bits,
    predictive_entropy,
    predictive_std,
    shifted_views,
)
from medalign.models.calibration import Calibration, FindingCalibration


def _overconfident(n: int = 4000, t_true: float = 4.0, seed: int = 0, b_true: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z + b_true) but reported as scores t_true * z: sigmoid(score)
    is far too sure of itself and blind to the base rate, sigmoid(score / t_true + b_true)
    is exactly calibrated."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-(z + b_true)))).astype(int)
    return y, t_true * z


def test_platt_scaling_recovers_t_and_b_lowers_nll_and_ece_and_keeps_the_auc():
    y, s = _overconfident(b_true=-1.2)
    t, b = fit_scaling(y, s)
    assert t == pytest.approx(4.0, rel=0.1) and b == pytest.approx(-1.2, abs=0.15)
    before, after = 1.0 / (1.0 + np.exp(-s)), 1.0 / (1.0 + np.exp(-(s / t + b)))
    assert nll(y, s, t, b) < nll(y, s, 1.0) - 0.1
    assert expected_calibration_error(y, before) > 0.1 > 0.03 > expected_calibration_error(y, after)
    assert roc_auc_score(y, after) == roc_auc_score(y, before) == roc_auc_score(y, s)
    # the base-rate offset is what a temperature alone cannot fix: the best T at b = 0 stays off
    best_t_only = min(np.exp(np.linspace(-1, 3, 401)), key=lambda tt: nll(y, s, tt))
    assert expected_calibration_error(y, 1.0 / (1.0 + np.exp(-s / best_t_only))) > 0.05


def test_the_prior_keeps_a_separable_finding_sane():
    """30 cases split perfectly by the score: maximum likelihood sends T to 0 (the first
    round fitted T = 0.01, certainty no test set bears out); the prior holds it near the
    score scale, and labels of one class still leave the model as shipped."""
    y = np.r_[np.zeros(15), np.ones(15)]
    s = np.r_[np.linspace(-3.0, -1.0, 15), np.linspace(1.0, 3.0, 15)]
    t, b = fit_scaling(y, s)
    assert 0.15 < t < 1.0 and T_BOUNDS[0] < t and abs(b) < 0.1
    assert 1.0 / (1.0 + np.exp(-(1.0 / t + b))) < 0.99  # the weakest positive is not "certain"
    assert fit_scaling(np.zeros(5), np.arange(5.0)) == Scaling(1.0, 0.0)  # one class cannot pin a scaling


def test_findings_with_few_cases_share_a_pooled_scaling():
    y, s = _overconfident(400, b_true=0.8)
    labels = np.stack([y, y, np.r_[np.ones(3, int), np.zeros(397, int)]], axis=1)
    labels[:10, 1] = -1  # unknown labels are skipped
    fits = fit_scalings(labels, np.stack([s, s / 2.0, s], axis=1), ["a", "b", "rare"])
    assert fits["b"].temperature == pytest.approx(fits["a"].temperature / 2.0, rel=0.1)
    assert fits["b"].bias == pytest.approx(fits["a"].bias, abs=0.15) and fits["a"].bias > 0.4
    assert fits["rare"] == pytest.approx(fit_scaling(labels[:, 2], s))  # pooled over the one rare finding


def test_ece_by_hand_and_bin_edges():
    y = np.array([1, 0, 1, 1])
    p = np.array([0.05, 0.05, 0.95, 1.0])  # bins 0 (two cases) and 9 (two, 1.0 included)
    conf, freq, count = reliability_bins(y, p)
    assert count[0] == 2 and count[9] == 2 and count.sum() == 4 and np.isnan(conf[5])
    # bin 0: |0.5 - 0.05| = 0.45; bin 9: |1 - 0.975| = 0.025; weights 1/2 each
    assert expected_calibration_error(y, p) == pytest.approx(0.5 * 0.45 + 0.5 * 0.025)


def test_uncertainty_auroc_separates_wrong_from_right():
    y = np.array([1, 1, 0, 0, 1, 0])
    p = np.array([0.9, 0.4, 0.1, 0.6, 0.8, 0.2])  # wrong: cases 1 and 3
    assert uncertainty_auroc(y, p, np.array([0.0, 0.3, 0.1, 0.2, 0.05, 0.0])) == 1.0
    assert uncertainty_auroc(y, p, np.array([0.3, 0.0, 0.3, 0.0, 0.3, 0.3])) == 0.0
    assert np.isnan(uncertainty_auroc(y, y.astype(float), np.zeros(6)))


def test_fitted_calibration_keeps_flags_and_auc_and_the_models_own_auc():
    y, s = _overconfident(2000, b_true=-1.0)
    cohort = CohortScores(["Emphysema"], y[:, None], s[:, None], np.zeros((2000, 1)), np.zeros((2000, 1)))
    current = Calibration({"Emphysema": FindingCalibration(threshold=0.7, heldout_auc=0.91, temperature=1.5, bias=0.3)},
                          "training")
    new, report = fitted_calibration(cohort, current, "/my/cohort")
    old_c, new_c = current.of("Emphysema"), new.of("Emphysema")
    assert new_c.temperature == pytest.approx(4.0, rel=0.15) and new_c.bias == pytest.approx(-1.0, abs=0.3)
    assert new_c.heldout_auc == 0.91 and new.fitted_on == "/my/cohort"
    flags_before = [old_c.probability(v) >= old_c.threshold for v in s]
    flags_after = [new_c.probability(v) >= new_c.threshold - 1e-12 for v in s]
    assert flags_before == flags_after and any(flags_before) and not all(flags_before)
    r = report["Emphysema"]
    assert r["nll_after"] < r["nll_before"] and r["ece_after"] < r["ece_before"] and r["n"] == 2000
    assert r["bias"] == new_c.bias


def test_bias_is_stored_and_calibrations_without_it_still_load():
    c = Calibration({"Emphysema": FindingCalibration(0.6, 0.8, temperature=2.0, bias=-0.7)}, "cohort")
    back = Calibration.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c and back.of("Emphysema").probability(1.4) == pytest.approx(0.5)  # 1.4 / 2 - 0.7 = 0
    old = Calibration.from_dict({"fitted_on": "x", "findings": {"Emphysema": {"threshold": 0.6, "temperature": 2.0}}})
    assert old.of("Emphysema") == FindingCalibration(0.6, None, 2.0, 0.0)  # stored before the bias existed
    extra = {"thresholds": {"A": 0.4}, "temperatures": {"A": 3.0}}
    assert Calibration.from_checkpoint_extra(extra).of("A").bias == 0.0
    assert Calibration.from_checkpoint_extra(extra | {"biases": {"A": 0.25}}).of("A").bias == 0.25
    f = FindingCalibration(temperature=3.0, bias=-0.5)
    assert f.probability(f.score_at(0.8)) == pytest.approx(0.8)


def test_shifted_views_translate_by_5_mm_and_fill_with_the_minimum():
    x = torch.arange(2 * 10 * 12 * 8, dtype=torch.float32).reshape(1, 2, 10, 12, 8) + 5.0
    views = list(shifted_views(x, 7, spacing=(2.5, 1.25, 5.0)))
    assert len(views) == 7 and all(v.shape == x.shape for v in views)
    step_x = round(TTA_SHIFT_MM / 2.5)
    assert torch.equal(views[0][:, :, step_x:], x[:, :, :-step_x]) and (views[0][:, :, :step_x] == 5.0).all()
    assert torch.equal(views[1][:, :, :-step_x], x[:, :, step_x:])  # the other way
    assert torch.equal(views[2][:, :, :, 4:], x[:, :, :, :-4])  # y: 5 mm / 1.25 mm = 4 voxels
    assert torch.equal(views[4][..., 1:], x[..., :-1])  # z: one 5 mm voxel
    assert torch.equal(views[6][:, :, 4:], x[:, :, :-4])  # second round: twice the distance
    assert torch.equal(x[0, 0, 0, 0], torch.tensor([5.0, 6, 7, 8, 9, 10, 11, 12]))  # the input is untouched


def test_predictive_std_is_on_the_calibrated_scale():
    scores = torch.tensor([1.0, 2.0, 3.0])
    plain, cooled = FindingCalibration(), FindingCalibration(temperature=10.0)
    assert predictive_std(scores, plain) == pytest.approx(float(torch.sigmoid(scores).std(unbiased=False)), abs=1e-7)
    assert predictive_std(scores, cooled) < predictive_std(scores, plain)  # a cooled model is less spread too
    assert predictive_std(torch.tensor([2.0]), plain) == 0.0
    shifted = FindingCalibration(bias=-2.0)  # the bias moves every member: 1 - 2 = -1 ...
    assert predictive_std(scores, shifted) == pytest.approx(float(torch.sigmoid(scores - 2).std(unbiased=False)), abs=1e-7)


def test_entropy_uncertainty_counts_both_spread_and_closeness_to_a_half():
    plain = FindingCalibration()
    assert binary_entropy_bits(0.5) == 1.0 and binary_entropy_bits(0.0) == binary_entropy_bits(1.0) == 0.0
    assert binary_entropy_bits(0.1) == pytest.approx(0.468996, abs=1e-6)
    sure = predictive_entropy(torch.tensor([6.0, 7.0, 8.0]), plain)
    toss_up = predictive_entropy(torch.tensor([0.0, 0.0]), plain)  # agreed: std 0, still a coin toss
    split = predictive_entropy(torch.tensor([-6.0, 6.0]), plain)  # each sure, the ensemble split
    assert sure < 0.05 and toss_up == pytest.approx(1.0) and split == pytest.approx(1.0)
    assert predictive_std(torch.tensor([0.0, 0.0]), plain) == 0.0  # what the std alone would say
    # the calibrated scale: a negative bias turns an agreed 0.73 into a sure "absent"
    assert predictive_entropy(torch.tensor([1.0, 1.0]), FindingCalibration(bias=-6.0)) < 0.1
    agreed = binary_entropy_bits(1.0 / (1.0 + np.exp(-1.0)))
    assert predictive_entropy(torch.tensor([1.0, 1.0]), plain) == pytest.approx(agreed)


def test_results_carry_the_std_beside_the_entropy_and_old_results_still_read():
    f = FindingResult(name="Emphysema", probability=0.7, uncertainty=0.88, flagged=True, score=0.85, uncertainty_std=0.04)
    result = ScreeningResult({"path": "ct.nii.gz"}, "m", "cpu", [f])
    d = result.to_dict()
    assert d["findings"][0]["uncertainty"] == 0.88 and d["findings"][0]["uncertainty_std"] == 0.04
    assert ScreeningResult.from_dict(d).findings[0].uncertainty_std == 0.04
    del d["findings"][0]["uncertainty_std"]  # results written before it existed
    assert ScreeningResult.from_dict(d).findings[0].uncertainty_std is None
    assert result.csv_text().splitlines()[0].startswith("finding,probability,uncertainty,")


def test_screener_tta_encodes_shifted_views_and_widens_the_ensemble():
    from helpers import tiny_test_model

    from medalign.inference.screener import Screener

    model = tiny_test_model()
    volume = synthetic_ct(seed=3, blob_ras=(40.0, 20.0, 10.0))
    calls = []
    encode = model.image_features
    model.image_features = lambda x: calls.append(x.shape) or encode(x)  # count encodings of the real model
    plain = Screener(model=model, findings=["Lung nodule"], device="cpu")(volume, with_maps=False).findings[0]
    assert len(calls) == 1
    tta = Screener(model=model, findings=["Lung nodule"], device="cpu", tta=3)(volume, with_maps=False).findings[0]
    assert len(calls) == 1 + 3 and len(set(calls)) == 1  # the plain encoding comes from the feature cache
    assert tta.score != plain.score and tta.uncertainty != plain.uncertainty
    with pytest.raises(InputError, match="test-time views must lie between 0 and"):
        Screener(model=model, findings=["Lung nodule"], device="cpu", tta=-1)


def _cohort(root, n=10):
    from medalign.core.volume_io import write_volume

    (root / "volumes").mkdir(parents=True)
    rows = []
    for i in range(n):
        write_volume(synthetic_ct(seed=i, blob_ras=(40.0, 20.0, 10.0) if i % 2 else None), root / "volumes" / f"c{i}.nii.gz")
        rows.append({"VolumeName": f"c{i}.nii.gz", "Lung nodule": i % 2, "Emphysema": int(i % 3 == 0)})
    with (root / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def test_cli_calibrate_stores_temperatures_that_load_applies(tiny_model, tmp_path, capsys):
    from medalign.models import load, registry

    data = _cohort(tmp_path / "cohort")
    assert main(["calibrate", "--data", str(data), "--model", tiny_model, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Lung nodule" in out and "Emphysema" in out and "calibration/tiny.json" in out
    stored = json.loads((registry.cache_dir() / "calibration" / "tiny.json").read_text())
    assert stored["model"] == "tiny" and stored["fitted_on"] == str(data.resolve())
    temps = {n: stored["findings"][n]["temperature"] for n in ("Lung nodule", "Emphysema")}
    assert all(t > 0 for t in temps.values()) and temps["Lung nodule"] != 1.0
    assert load(tiny_model).calibration.of("Lung nodule").temperature == pytest.approx(temps["Lung nodule"])
    bias = stored["findings"]["Lung nodule"]["bias"]
    assert load(tiny_model).calibration.of("Lung nodule").bias == pytest.approx(bias) and bias != 0.0
    assert main(["calibrate", "--data", str(data), "--model", "no-such-model"]) == 2
    assert "medalign: error:" in capsys.readouterr().err
    assert main(["calibrate", "--data", str(tmp_path / "empty"), "--model", tiny_model]) == 2
