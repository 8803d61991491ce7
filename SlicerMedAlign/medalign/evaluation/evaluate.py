"""``medalign eval``: screen a labelled cohort and measure how good a model is.

Writes metrics.json / metrics.csv (per finding and macro, with bootstrap 95% intervals),
predictions.csv (per case and finding), roc.png, calibration (expected calibration error
over ``ECE_BINS`` equal-width bins, NLL, the uncertainty's AUROC for wrong vs right;
``evaluation.calibration``) with reliability.png and, where masks exist, localization
(pointing game and voxel-level map AUC).
"""

from __future__ import annotations

import csv
import io as _io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medalign.core.errors import InputError
from medalign.core.volume import Volume
from medalign.data.cohorts import Case, load_cohort
from medalign.data.labels import resolve_labels
from medalign.evaluation.calibration import (
    ECE_BINS,
    expected_calibration_error,
    nll,
    plot_reliability,
    uncertainty_auroc,
)
from medalign.evaluation.metrics import bootstrap_metrics, pointing_hit, voxel_auc


def mask_bit(mask: Volume, finding: str) -> np.ndarray | None:
    """One finding's lesion from a phantom-style bitmask (bit f = CT_RATE_FINDINGS[f]); None
    for findings outside CT-RATE, which such masks cannot carry."""
    from medalign.knowledge.findings import CT_RATE_FINDINGS

    if finding not in CT_RATE_FINDINGS:
        return None
    bit = CT_RATE_FINDINGS.index(finding)
    return ((mask.array.astype(np.int64) >> bit) & 1).astype(bool)


def localization(map_volume: Volume, peak_ras: Sequence[float] | None, mask: Volume, lesion: np.ndarray, tolerance_mm: float) -> dict:
    """Pointing game (strict and with tolerance) and voxel AUC of one map against one mask;
    ``peak_ras`` None (a map without a hotspot) misses."""
    from scipy import ndimage

    tol = np.array([tolerance_mm / s for s in mask.spacing])
    # voxel AUC on the mask grid, every 2nd voxel along each axis to bound the cost
    k, j, i = (np.arange(0, n, 2) for n in lesion.shape)
    kk, jj, ii = np.meshgrid(k, j, i, indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1)
    ras = mask.ijk_to_ras_points(ijk)
    mijk = map_volume.ras_to_ijk_points(ras)
    values = ndimage.map_coordinates(map_volume.array, [mijk[:, 2], mijk[:, 1], mijk[:, 0]], order=1, mode="nearest")
    peak_ijk = None if peak_ras is None else mask.ras_to_ijk_points(np.asarray(peak_ras)[None])[0]
    return {
        "hit": peak_ijk is not None and pointing_hit(lesion, peak_ijk),
        "hit_tolerant": peak_ijk is not None and pointing_hit(lesion, peak_ijk, tol),
        "voxel_auc": voxel_auc(values, lesion[kk, jj, ii]),
    }


def evaluate(
    data: str | Path,
    out: str | Path,
    model=None,
    findings: Sequence[str] | None = None,
    device: str = "auto",
    n_boot: int = 1000,
    tolerance_mm: float | None = None,
    progress: bool = True,
    screener=None,
    tta: int = 0,
    adapter=None,
) -> dict:
    """Screen every case of ``data`` with ``model`` (name or model object), optionally with a
    few-shot ``adapter`` (file or ``Adapter``), and write metrics to ``out``; ``tta``
    test-time views feed the uncertainty (``inference.uncertainty``)."""
    from tqdm import tqdm

    from medalign.core.atomic import atomic_output, write_text
    from medalign.core.output_folder import prepare
    from medalign.core.volume_io import read_volume
    from medalign.inference.screener import Screener

    cases = [c for c in load_cohort(data) if c.labels is not None or c.report]
    if not cases:
        raise InputError(f"{data} has no labels.csv or reports.csv to evaluate against.")
    out = prepare(out)  # an unusable --out fails now, not after screening the whole cohort
    screener = screener or Screener(model=model, findings=findings or labelled_findings(cases), device=device, tta=tta,
                                    adapter=adapter)
    names = screener.findings
    labels = resolve_labels(cases, names).numpy()
    tol = tolerance_mm if tolerance_mm is not None else _default_tolerance(screener.model)
    probs = np.zeros((len(cases), len(names)), dtype=np.float64)
    scores, uncs = np.zeros_like(probs), np.zeros_like(probs)
    loc: dict[str, list[dict]] = {n: [] for n in names}
    for ci, case in enumerate(tqdm(cases, desc="evaluating", unit="ct", disable=not progress)):
        volume = read_volume(case.volume_path)
        need_maps = case.mask_path is not None
        result = screener(volume, with_maps=need_maps)
        mask = read_volume(case.mask_path) if need_maps else None
        for fi, name in enumerate(names):
            fr = result.finding(name)
            probs[ci, fi], scores[ci, fi], uncs[ci, fi] = fr.probability, fr.score, fr.uncertainty
            if mask is not None and labels[ci, fi] == 1 and fr.map is not None:
                lesion = mask_bit(mask, name)
                if lesion is not None and lesion.any():  # no hotspot (no positive map value) points nowhere: a miss
                    loc[name].append(localization(fr.map, fr.hotspot.ras if fr.hotspot else None, mask, lesion, tol))

    per_finding = {}
    # 1000 resamples x 18 findings take minutes: a bar, so the run never looks stuck
    boot = tqdm(names, desc=f"bootstrap ({n_boot} resamples)", unit="finding", disable=not progress or n_boot == 0)
    for fi, name in enumerate(boot):
        known = labels[:, fi] >= 0
        y, p = labels[known, fi], probs[known, fi]
        entry: dict = {"n": int(known.sum()), "positives": int(y.sum())}
        if len(np.unique(y)) == 2:
            entry.update({k: v.as_dict() for k, v in bootstrap_metrics(y, p, n_boot=n_boot).items()})
        if len(y):
            entry.update(_calibration_entry(y, p, scores[known, fi], uncs[known, fi], screener.calibration().of(name)))
        if loc[name]:
            entry["pointing_game"] = float(np.mean([r["hit"] for r in loc[name]]))
            entry["pointing_game_tolerant"] = float(np.mean([r["hit_tolerant"] for r in loc[name]]))
            aucs = [r["voxel_auc"] for r in loc[name] if np.isfinite(r["voxel_auc"])]
            entry["map_voxel_auc"] = float(np.mean(aucs)) if aucs else float("nan")
            entry["localized_cases"] = len(loc[name])
        per_finding[name] = entry
    macro = _macro(per_finding)
    summary = {
        "data": str(data), "model": screener.model_name, "cases": len(cases),
        "adapter": None if adapter is None or not isinstance(adapter, (str, Path)) else str(adapter),
        "tolerance_mm": tol, "ece_bins": ECE_BINS, "tta": screener.tta, "macro": macro, "findings": per_finding,
    }
    write_text(out / "metrics.json", json.dumps(summary, indent=2, default=float) + "\n")
    write_text(out / "metrics.csv", _metrics_csv(per_finding, macro))
    write_text(out / "predictions.csv", _predictions_csv(cases, names, probs, labels, uncs))
    with atomic_output(out / "roc.png") as tmp:
        _plot_roc(names, labels, probs, tmp)
    known = {n: labels[:, fi] >= 0 for fi, n in enumerate(names)}
    with atomic_output(out / "reliability.png") as tmp:
        plot_reliability({n: labels[known[n], fi] for fi, n in enumerate(names)},
                         {n: probs[known[n], fi] for fi, n in enumerate(names)}, tmp,
                         title=f"{screener.model_name} on {len(cases)} cases")
    return summary


def _calibration_entry(y: np.ndarray, p: np.ndarray, scores: np.ndarray, unc: np.ndarray, fitted) -> dict:
    """ECE and NLL of the probabilities as the model reports them (its fitted temperature
    and bias applied), and how well the uncertainty flags the wrong ones."""
    return {
        "ece": expected_calibration_error(y, p),
        "nll": nll(y, scores, fitted.temperature, fitted.bias),
        "temperature": fitted.temperature,
        "bias": fitted.bias,
        "uncertainty_auroc": uncertainty_auroc(y, p, unc),
    }


def labelled_findings(cases: list[Case]) -> list[str]:
    """The CT-RATE findings some case of the cohort has a label column for (all 18 if none)."""
    from medalign.knowledge.findings import CT_RATE_FINDINGS

    seen = set()
    for c in cases:
        if c.labels:
            seen |= {k for k, v in c.labels.items()}
    return [f for f in CT_RATE_FINDINGS if f in seen] or list(CT_RATE_FINDINGS)


def _default_tolerance(model) -> float:
    """Half a map cell: the map cannot place a peak more finely than its token grid."""
    patch = model.token_layout()[0]
    return float(max(p * s for p, s in zip(patch, model.profile.spacing)) / 2)


def _macro(per_finding: dict) -> dict:
    out = {}
    for key in ("auc", "acc", "f1", "precision"):
        vals = [e[key]["value"] for e in per_finding.values() if key in e and np.isfinite(e[key]["value"])]
        out[key] = float(np.mean(vals)) if vals else float("nan")
    for key in ("ece", "nll", "uncertainty_auroc", "pointing_game", "pointing_game_tolerant", "map_voxel_auc"):
        vals = [e[key] for e in per_finding.values() if key in e and np.isfinite(e[key])]
        if vals:
            out[key] = float(np.mean(vals))
    return out


def _metrics_csv(per_finding: dict, macro: dict) -> str:
    cols = ["finding", "n", "positives", "auc", "auc_ci_low", "auc_ci_high", "threshold", "acc", "f1", "precision",
            "ece", "nll", "uncertainty_auroc", "pointing_game", "pointing_game_tolerant", "map_voxel_auc"]
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for name, e in list(per_finding.items()) + [
        ("MACRO", {k: {"value": v} if k in ("auc", "acc", "f1", "precision") else v for k, v in macro.items()})
    ]:
        def val(k, e=e):
            v = e.get(k)
            return "" if v is None else (round(v["value"], 4) if isinstance(v, dict) else (round(v, 4) if isinstance(v, float) else v))
        auc = e.get("auc", {})
        w.writerow([name, e.get("n", ""), e.get("positives", ""), val("auc"),
                    round(auc["ci_low"], 4) if "ci_low" in auc else "", round(auc["ci_high"], 4) if "ci_high" in auc else "",
                    val("threshold"), val("acc"), val("f1"), val("precision"),
                    val("ece"), val("nll"), val("uncertainty_auroc"),
                    val("pointing_game"), val("pointing_game_tolerant"), val("map_voxel_auc")])
    return buf.getvalue()


def _predictions_csv(cases: list[Case], names: list[str], probs: np.ndarray, labels: np.ndarray, uncs: np.ndarray) -> str:
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["VolumeName"] + [f"{n} (p)" for n in names] + [f"{n} (label)" for n in names]
               + [f"{n} (uncertainty)" for n in names])
    for ci, c in enumerate(cases):
        w.writerow([c.case_id] + [round(float(v), 6) for v in probs[ci]] + [int(v) for v in labels[ci]]
                   + [round(float(v), 6) for v in uncs[ci]])
    return buf.getvalue()


def _plot_roc(names: list[str], labels: np.ndarray, probs: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(7, 6.5), dpi=110)
    ax.set_prop_cycle(color=plt.cm.tab20(np.linspace(0, 1, 20)))  # 18 findings: one colour each
    for fi, name in enumerate(names):
        known = labels[:, fi] >= 0
        y, p = labels[known, fi], probs[known, fi]
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, lw=1.2, label=f"{name} ({roc_auc_score(y, p):.2f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title="ROC per finding (AUC)")
    ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
