"""Are the probabilities honest? Expected calibration error, negative log-likelihood,
Platt scaling fitted on labelled data, the uncertainty's power to tell wrong from right
predictions, and the reliability diagram.

Platt scaling rescales and shifts each finding's present-minus-absent score,
p = sigmoid(score / T + b). T > 0 stretches or squeezes an over- or under-confident score;
the bias b moves the base rate, which a domain shift (another scanner, another contrast
phase) offsets and which no temperature can undo. On 120 shifted test phantoms the macro
ECE is 0.075 as shipped, 0.067 with temperature alone, 0.061 with Platt scaling (pooled
0.036, 0.032, 0.019), where perfectly calibrated probabilities would still score 0.048
(pooled 0.016): ECE's noise floor at 120 cases. With 300 calibration and 400 test cases
it is 0.060 as shipped, 0.053 with temperature alone, 0.040 with Platt scaling (pooled
0.036, 0.033, 0.021). T > 0 keeps the ranking, hence the AUC.

(log T, b) is fitted **per finding**, because the findings' score scales differ by a
factor of several, as the maximum a-posteriori estimate: the summed NLL plus a weak
Gaussian prior centred on the model as shipped (log T = 0, b = 0) with standard deviations
``PRIOR_SD_LOG_T`` and ``PRIOR_SD_BIAS``. Without it a finding the calibration set happens
to separate perfectly drives T to its bound (T = 0.01 on 30 cases: certainty no test set
bears out); the prior costs as much as about one case's worth of evidence, so a hundred
cases overrule it wherever they disagree. Measured on the shifted phantoms
(``Testing/benchmarks/calibration_shift.py``): fitted on 30 calibration cases (20 draws),
the prior halves the test NLL (0.38 against 0.81 without it, whose smallest T was 0.01);
on 120 cases the prior's width no longer matters (test macro ECE 0.059-0.062 for SDs from
(0.5, 1) to none). T stays within ``T_BOUNDS`` regardless. A finding with fewer than
``MIN_PER_CLASS`` positives or negatives would still overfit its own pair and gets the one
pair fitted on all such findings pooled ((1, 0) if none).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

#: Equal-width probability bins of the expected calibration error and of the diagram.
ECE_BINS = 10
MIN_PER_CLASS = 5
#: Hard range of a fitted temperature: a score 20 times too sharp or too flat.
T_BOUNDS = (0.05, 20.0)
#: Prior widths. log T: one SD is a factor 4.5 on the score scale, so the bounds lie two
#: SDs out. b: one SD of 2 log-odds moves a 50 % base rate to 12 % or 88 %, more than the
#: shifts seen (phantom noise/contrast, CT-RATE sites), so the data decide within it.
PRIOR_SD_LOG_T = 1.5
PRIOR_SD_BIAS = 2.0


class Scaling(NamedTuple):
    """One finding's fitted Platt scaling: probability = sigmoid(score / temperature + bias)."""

    temperature: float = 1.0
    bias: float = 0.0


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def nll(y: np.ndarray, scores: np.ndarray, temperature: float = 1.0, bias: float = 0.0) -> float:
    """Mean binary negative log-likelihood of labels ``y`` under sigmoid(score / T + b)."""
    z = np.asarray(scores, dtype=np.float64) / float(temperature) + float(bias)
    y = np.asarray(y, dtype=np.float64)
    # -log sigmoid(z) = logaddexp(0, -z); -log(1 - sigmoid(z)) = logaddexp(0, z)
    return float(np.mean(y * np.logaddexp(0.0, -z) + (1.0 - y) * np.logaddexp(0.0, z)))


def _neg_log_posterior(params: np.ndarray, y: np.ndarray, s: np.ndarray) -> tuple[float, np.ndarray]:
    """Summed NLL plus the Gaussian prior's penalty over (log T, b), and its gradient."""
    log_t, b = params
    z = s * np.exp(-log_t) + b
    loss = np.sum(y * np.logaddexp(0.0, -z) + (1.0 - y) * np.logaddexp(0.0, z))
    loss += 0.5 * (log_t / PRIOR_SD_LOG_T) ** 2 + 0.5 * (b / PRIOR_SD_BIAS) ** 2
    residual = _sigmoid(z) - y  # d loss / d z
    grad = np.array([np.sum(residual * -(z - b)) + log_t / PRIOR_SD_LOG_T**2,
                     np.sum(residual) + b / PRIOR_SD_BIAS**2])
    return float(loss), grad


def fit_scaling(y: np.ndarray, scores: np.ndarray) -> Scaling:
    """The MAP (T, b) of sigmoid(score / T + b) under the module's prior (L-BFGS-B on
    (log T, b) from the prior's centre, T within ``T_BOUNDS``). Labels of one class only
    cannot pin a scaling: (1, 0) then."""
    from scipy.optimize import minimize

    y = np.asarray(y, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if len(np.unique(y)) < 2:
        return Scaling()
    res = minimize(_neg_log_posterior, np.zeros(2), args=(y, s), jac=True, method="L-BFGS-B",
                   bounds=[tuple(np.log(T_BOUNDS)), (None, None)], options={"gtol": 1e-9, "ftol": 1e-12})
    return Scaling(float(np.exp(res.x[0])), float(res.x[1]))


def fit_scalings(labels: np.ndarray, scores: np.ndarray, names: list[str]) -> dict[str, Scaling]:
    """Per finding (T, b) on (cases x findings) arrays (label -1: unknown, skipped);
    findings with too few cases of a class share one pooled pair (module docstring)."""
    out: dict[str, Scaling] = {}
    pooled_y, pooled_s, pooled_names = [], [], []
    for j, name in enumerate(names):
        known = labels[:, j] >= 0
        y, s = labels[known, j], scores[known, j]
        if min(int((y == 1).sum()), int((y == 0).sum())) >= MIN_PER_CLASS:
            out[name] = fit_scaling(y, s)
        else:
            pooled_y.append(y)
            pooled_s.append(s)
            pooled_names.append(name)
    if pooled_names:
        pooled = fit_scaling(np.concatenate(pooled_y), np.concatenate(pooled_s))
        out.update({name: pooled for name in pooled_names})
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
