"""Are the probabilities honest? Expected calibration error, negative log-likelihood,
temperature scaling fitted on labelled data, the uncertainty's power to tell wrong from
right predictions, and the reliability diagram.

Temperature scaling (Guo et al. 2017) rescales each finding's present-minus-absent score,
p = sigmoid(score / T): one positive number, so the ranking of the cases, hence the AUC,
cannot change, while over- or under-confident scores are stretched or squeezed towards
the labels. T is fitted **per finding** by minimising the NLL on the labelled cohort,
because the findings' score scales differ by a factor of several (a pooled T fits none of
them); a finding with fewer than ``MIN_PER_CLASS`` positives or negatives would overfit
its own T and gets the one T fitted on all such findings pooled (1 if there are none).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Equal-width probability bins of the expected calibration error and of the diagram.
ECE_BINS = 10
MIN_PER_CLASS = 5
T_BOUNDS = (0.01, 100.0)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def nll(y: np.ndarray, scores: np.ndarray, temperature: float = 1.0) -> float:
    """Mean binary negative log-likelihood of labels ``y`` under sigmoid(score / T)."""
    z = np.asarray(scores, dtype=np.float64) / float(temperature)
    y = np.asarray(y, dtype=np.float64)
    # -log sigmoid(z) = logaddexp(0, -z); -log(1 - sigmoid(z)) = logaddexp(0, z)
    return float(np.mean(y * np.logaddexp(0.0, -z) + (1.0 - y) * np.logaddexp(0.0, z)))


def fit_temperature(y: np.ndarray, scores: np.ndarray) -> float:
    """The T > 0 minimising ``nll`` (a 1-D convex problem in log T: bounded scalar search).
    Labels of one class only cannot pin a temperature: T = 1 then."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y, dtype=np.float64)
    if len(np.unique(y)) < 2:
        return 1.0
    lo, hi = np.log(T_BOUNDS)
    res = minimize_scalar(lambda log_t: nll(y, scores, float(np.exp(log_t))), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-6})
    return float(np.exp(res.x))


def fit_temperatures(labels: np.ndarray, scores: np.ndarray, names: list[str]) -> dict[str, float]:
    """Per finding T on (cases x findings) arrays (label -1: unknown, skipped); findings
    with too few cases of a class share one pooled T (module docstring)."""
    out: dict[str, float] = {}
    pooled_y, pooled_s, pooled_names = [], [], []
    for j, name in enumerate(names):
        known = labels[:, j] >= 0
        y, s = labels[known, j], scores[known, j]
        if min(int((y == 1).sum()), int((y == 0).sum())) >= MIN_PER_CLASS:
            out[name] = fit_temperature(y, s)
        else:
            pooled_y.append(y)
            pooled_s.append(s)
            pooled_names.append(name)
    if pooled_names:
        t = fit_temperature(np.concatenate(pooled_y), np.concatenate(pooled_s))
        out.update({name: t for name in pooled_names})
    return out


def reliability_bins(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of predicted probability: (mean prediction, fraction positive,
    count); empty bins hold NaN and 0. A probability of exactly 1 falls in the last bin."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    count = np.bincount(idx, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(idx, weights=p, minlength=bins) / count
        freq = np.bincount(idx, weights=y, minlength=bins) / count
    return conf, freq, count


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over bins of (share of cases) x |fraction positive - mean predicted probability|."""
    if len(y) == 0:
        return float("nan")
    conf, freq, count = reliability_bins(y, p, bins)
    filled = count > 0
    return float(np.sum(count[filled] / count.sum() * np.abs(freq[filled] - conf[filled])))


def uncertainty_auroc(y: np.ndarray, p: np.ndarray, uncertainty: np.ndarray) -> float:
    """AUROC of ``uncertainty`` for telling wrong from right predictions, the prediction
    being the calibrated probability's own decision (p >= 0.5). NaN if all are right or
    all wrong. 0.5 is chance; a useful uncertainty is larger where the model is wrong."""
    from sklearn.metrics import roc_auc_score

    wrong = (np.asarray(p) >= 0.5).astype(int) != np.asarray(y).astype(int)
    if wrong.all() or not wrong.any():
        return float("nan")
    return float(roc_auc_score(wrong, uncertainty))


def plot_reliability(y_by_finding: dict[str, np.ndarray], p_by_finding: dict[str, np.ndarray], path: Path,
                     title: str = "Reliability diagram") -> None:
    """All findings pooled (bars: fraction positive per bin, with the count) and each
    finding as a thin line; the diagonal is perfect calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ys = np.concatenate(list(y_by_finding.values())) if y_by_finding else np.zeros(0)
    ps = np.concatenate(list(p_by_finding.values())) if p_by_finding else np.zeros(0)
    fig, ax = plt.subplots(figsize=(6.5, 6.2), dpi=110)
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    conf, freq, count = reliability_bins(ys, ps)
    filled = count > 0
    ax.bar(edges[:-1][filled], freq[filled], width=1.0 / ECE_BINS, align="edge", alpha=0.35, color="tab:blue",
           edgecolor="tab:blue", label=f"all findings (ECE {expected_calibration_error(ys, ps):.3f})")
    for x, f, c in zip(edges[:-1][filled], freq[filled], count[filled]):
        ax.text(x + 0.5 / ECE_BINS, min(f + 0.02, 0.97), f"{int(c)}", ha="center", fontsize=6.5)
    ax.set_prop_cycle(color=plt.cm.tab20(np.linspace(0, 1, 20)))
    for name, y in y_by_finding.items():
        c_f, f_f, n_f = reliability_bins(y, p_by_finding[name])
        keep = n_f > 0
        ax.plot(c_f[keep], f_f[keep], lw=0.8, marker=".", ms=3, alpha=0.8, label=name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted probability", ylabel="fraction positive",
           title=f"{title} ({ECE_BINS} equal-width bins; numbers: cases per bin)")
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
