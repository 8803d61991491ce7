"""Classification and localization metrics, computed the way published CT-RATE results are.

Threshold per finding at the ROC point nearest (0, 1); ACC, weighted F1 and weighted
precision at that threshold; percentile bootstrap 95% intervals.  Localization: the
pointing game (does the map's peak fall in the lesion mask) and voxel-level AUC of the map
against the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_score, roc_auc_score, roc_curve


def youden_nearest_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Threshold at the ROC point closest to the top-left corner (0, 1)."""
    fpr, tpr, thr = roc_curve(y, p)
    best = int(np.argmin(fpr**2 + (1 - tpr) ** 2))
    return float(min(thr[best], 1.0))


def point_metrics(y: np.ndarray, p: np.ndarray, threshold: float | None = None) -> dict[str, float]:
    """AUC, and ACC / weighted F1 / weighted precision at the ROC-nearest threshold."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=np.float64)
    if len(np.unique(y)) < 2:
        return {"auc": float("nan"), "threshold": float("nan"), "acc": float("nan"), "f1": float("nan"), "precision": float("nan")}
    t = youden_nearest_threshold(y, p) if threshold is None else threshold
    pred = (p >= t).astype(int)
    return {
        "auc": float(roc_auc_score(y, p)),
        "threshold": t,
        "acc": float(accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, average="weighted", zero_division=0)),
        "precision": float(precision_score(y, pred, average="weighted", zero_division=0)),
    }


@dataclass
class MetricWithCI:
    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high}


def bootstrap_metrics(y: np.ndarray, p: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, MetricWithCI]:
    """Point estimates with percentile 95% intervals; each resample re-picks its threshold."""
    point = point_metrics(y, p)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in ("auc", "acc", "f1", "precision")}
    n = len(y)
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        if len(np.unique(y[idx])) < 2:
            continue
        m = point_metrics(y[idx], p[idx])
        for k in samples:
            samples[k].append(m[k])
    out = {}
    for k, vals in samples.items():
        if vals:
            lo, hi = np.percentile(vals, [2.5, 97.5])
        else:
            lo = hi = float("nan")
        out[k] = MetricWithCI(point[k], float(lo), float(hi))
    out["threshold"] = MetricWithCI(point["threshold"], point["threshold"], point["threshold"])
    return out


def pointing_hit(mask: np.ndarray, peak_ijk: np.ndarray, tolerance_vox: np.ndarray | None = None) -> bool:
    """True when the peak (continuous ijk in the mask's grid) lies in the mask, or within
    ``tolerance_vox`` voxels of it (the pointing game of Zhang et al. allows a tolerance)."""
    ijk = np.round(peak_ijk).astype(int)
    k, j, i = ijk[2], ijk[1], ijk[0]
    shape = mask.shape
    if tolerance_vox is None:
        return bool(0 <= k < shape[0] and 0 <= j < shape[1] and 0 <= i < shape[2] and mask[k, j, i])
    ti, tj, tk = (int(np.ceil(t)) for t in tolerance_vox)
    ks = slice(max(k - tk, 0), max(min(k + tk + 1, shape[0]), 0))
    js = slice(max(j - tj, 0), max(min(j + tj + 1, shape[1]), 0))
    is_ = slice(max(i - ti, 0), max(min(i + ti + 1, shape[2]), 0))
    return bool(mask[ks, js, is_].any())


def voxel_auc(map_values: np.ndarray, mask: np.ndarray) -> float:
    """AUC of map values separating mask voxels from the rest (NaN if one class is empty)."""
    m = mask.reshape(-1).astype(bool)
    if m.all() or not m.any():
        return float("nan")
    return float(roc_auc_score(m, map_values.reshape(-1)))
