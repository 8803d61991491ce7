"""Metrics against cases small enough to compute by hand."""

import numpy as np
import pytest

from medalign.evaluation.metrics import bootstrap_metrics, point_metrics, pointing_hit, voxel_auc, youden_nearest_threshold


def test_auc_and_threshold_by_hand():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    # pairs (pos, neg): (0.35>0.1), (0.35<0.4), (0.8>0.1), (0.8>0.4) -> 3/4
    m = point_metrics(y, p)
    assert m["auc"] == pytest.approx(0.75)
    # ROC points: thresholds 0.8 -> (0, .5), 0.35 -> (.5, 1), 0.4 -> (.5, .5) ... nearest (0,1) is (0, .5) or (.5, 1): both 0.25
    assert m["threshold"] in (pytest.approx(0.8), pytest.approx(0.35))


def test_weighted_f1_precision_at_threshold():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.7, 0.6, 0.8, 0.9])
    m = point_metrics(y, p, threshold=0.65)
    pred = np.array([0, 0, 1, 0, 1, 1])
    # class 0: tp 2, fp 1, fn 1 -> P 2/3, R 2/3, F1 2/3 ; class 1 the same by symmetry
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx(2 / 3)
    assert (p >= 0.65).astype(int).tolist() == pred.tolist()


def test_youden_threshold_perfect_separation():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.7, 0.9])
    assert youden_nearest_threshold(y, p) == pytest.approx(0.7)


def test_bootstrap_interval_contains_point_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.3 + rng.normal(0.4, 0.2, 200), 0, 1)
    m = bootstrap_metrics(y, p, n_boot=200, seed=1)
    assert m["auc"].low <= m["auc"].value <= m["auc"].high
    assert m["auc"].high - m["auc"].low < 0.3


def test_pointing_hit_strict_and_tolerant():
    mask = np.zeros((5, 5, 5), bool)
    mask[2, 2, 2] = True
    assert pointing_hit(mask, np.array([2.2, 1.9, 2.0]))  # (i, j, k)
    assert not pointing_hit(mask, np.array([4.0, 2.0, 2.0]))
    assert pointing_hit(mask, np.array([4.0, 2.0, 2.0]), tolerance_vox=np.array([2, 0, 0]))


def test_voxel_auc():
    mask = np.array([0, 0, 1, 1], bool)
    assert voxel_auc(np.array([0.1, 0.2, 0.3, 0.4]), mask) == pytest.approx(1.0)
    assert np.isnan(voxel_auc(np.ones(4), np.zeros(4, bool)))
