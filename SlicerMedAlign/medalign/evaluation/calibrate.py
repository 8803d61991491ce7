"""``medalign calibrate``: fit each finding's Platt scaling (temperature T and bias b) on a
labelled cohort and store it with the model, so every later screening reports calibrated
probabilities.

The flag threshold moves with the scaling (it is a probability: the score at which a
finding was flagged stays the score at which it is flagged), so calibration changes the
probabilities and their honesty, never which cases are flagged or the AUC. The held-out
AUC stays the model's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medalign.core.errors import InputError
from medalign.data.cohorts import load_cohort
from medalign.data.labels import resolve_labels
from medalign.evaluation.calibration import expected_calibration_error, fit_scalings, nll
from medalign.models.calibration import Calibration, FindingCalibration


@dataclass
class CohortScores:
    """Per (case, finding): label (-1 unknown), raw score, reported probability, uncertainty
    (and the members' std beside it, where the results carry one)."""

    names: list[str]
    labels: np.ndarray
    scores: np.ndarray
    probs: np.ndarray
    uncertainty: np.ndarray
    uncertainty_std: np.ndarray | None = None


def score_cohort(data: str | Path, screener, progress: bool = True) -> CohortScores:
    """Screen every labelled case of ``data`` (no maps) and collect what calibration needs."""
    from tqdm import tqdm

    from medalign.core.volume_io import read_volume

    cases = [c for c in load_cohort(data) if c.labels is not None or c.report]
    if not cases:
        raise InputError(f"{data} has no labels.csv or reports.csv to calibrate against.")
    names = list(screener.findings)
    shape = (len(cases), len(names))
    scores, probs, unc, std = (np.zeros(shape) for _ in range(4))
    for ci, case in enumerate(tqdm(cases, desc="scoring", unit="ct", disable=not progress)):
        result = screener(read_volume(case.volume_path), with_maps=False)
        for fi, name in enumerate(names):
            fr = result.finding(name)
            scores[ci, fi], probs[ci, fi], unc[ci, fi] = fr.score, fr.probability, fr.uncertainty
            std[ci, fi] = np.nan if fr.uncertainty_std is None else fr.uncertainty_std
    return CohortScores(names, resolve_labels(cases, names).numpy(), scores, probs, unc, std)


def _moved_threshold(old: FindingCalibration, new: FindingCalibration) -> float:
    """The probability threshold that flags the same scores under the new scaling."""
    return new.probability(old.score_at(old.threshold))


def fitted_calibration(cohort: CohortScores, current: Calibration, fitted_on: str) -> tuple[Calibration, dict]:
    """Scalings fitted on ``cohort`` over the model's ``current`` calibration, and a
    {finding: {temperature, bias, nll_before, nll_after, ece_before, ece_after, n}} report
    (before: the model's current scaling)."""
    scalings = fit_scalings(cohort.labels, cohort.scores, cohort.names)
    findings, report = {}, {}
    for j, name in enumerate(cohort.names):
        known = cohort.labels[:, j] >= 0
        y, s = cohort.labels[known, j], cohort.scores[known, j]
        old, (t, b) = current.of(name), scalings[name]
        after = FindingCalibration(temperature=t, bias=b)
        findings[name] = FindingCalibration(threshold=_moved_threshold(old, after), heldout_auc=old.heldout_auc,
                                            temperature=t, bias=b)
        report[name] = {
            "n": int(known.sum()), "positives": int(y.sum()), "temperature": t, "bias": b,
            "nll_before": nll(y, s, old.temperature, old.bias), "nll_after": nll(y, s, t, b),
            "ece_before": expected_calibration_error(y, np.array([old.probability(v) for v in s])),
            "ece_after": expected_calibration_error(y, np.array([after.probability(v) for v in s])),
        }
    return current.merged(Calibration(findings, fitted_on)), report


def calibrate(data: str | Path, model: str | None = None, device: str = "auto", tta: int = 0,
              findings: list[str] | None = None, progress: bool = True) -> tuple[Path, dict]:
    """Fit Platt scalings for registry model ``model`` on the labelled cohort ``data`` and
    store them (``registry.save_calibration``); returns the file written and the report."""
    from medalign.inference.screener import Screener
    from medalign.models import registry

    name = model or registry.DEFAULT_MODEL
    registry.get(name)  # an unknown model is one sentence before any screening
    screener = Screener(model=name, findings=findings, device=device, tta=tta)
    cohort = score_cohort(data, screener, progress=progress)
    if not (cohort.labels >= 0).any():
        raise InputError(f"No case of {data} has a label for the findings being calibrated.")
    calibration, report = fitted_calibration(cohort, screener.model.calibration, str(Path(data).resolve()))
    path = registry.save_calibration(name, calibration)
    screener.model.calibration = calibration  # the in-process (cached) model agrees with the file
    return path, report
