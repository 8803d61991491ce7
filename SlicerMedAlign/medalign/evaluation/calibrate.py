"""``medalign calibrate``: fit each finding's Platt scaling (temperature T and bias b) on a
labelled cohort and store it with the model, so every later screening reports calibrated
probabilities.

The flag threshold moves with the scaling (it is a probability: the score at which a
finding was flagged stays the score at which it is flagged), so calibration changes the
probabilities and their honesty, never which cases are flagged or the AUC. The held-out
AUC stays the model's own.

With a few-shot adapter (``calibrate_adapter``) the scalings are fitted on the adapted
scores and stored in the adapter file instead, merged finding by finding over the
calibration it carries: they describe screening with that adapter, not the model alone.
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


def calibrate_adapter(data: str | Path, adapter_path: str | Path, model: str | None = None, device: str = "auto",
                      tta: int = 0, findings: list[str] | None = None, progress: bool = True) -> tuple[Path, dict]:
    """Fit Platt scalings on the scores of screening ``data`` WITH the adapter in
    ``adapter_path`` and store them in that file's calibration block (merged over what it
    had, rewritten atomically); the model's own calibration is left alone.

    ``model``: the registry model (default: the adapter's own when it names a registered
    one). A foreign adapter, or a finding it does not adapt, is one sentence before any
    screening. ``findings`` default to the adapter's findings.
    """
    from dataclasses import replace

    from medalign.inference.adapter import check_registry_model, read_adapter, save_adapter
    from medalign.inference.screener import Screener
    from medalign.models import registry

    adapter = read_adapter(adapter_path)
    name = model or (adapter.model if adapter.registered else registry.DEFAULT_MODEL)
    check_registry_model(adapter, name, adapter_path)  # a foreign adapter costs no model load, no screening
    names = _adapted_findings(adapter, findings, adapter_path)
    screener = Screener(model=name, findings=names, device=device, tta=tta, adapter=adapter)
    cohort = _labelled_only(score_cohort(data, screener, progress=progress), data)
    fitted_on = str(Path(data).resolve())
    calibration, report = fitted_calibration(cohort, screener.calibration(), fitted_on)
    fitted = Calibration({n: calibration.of(n) for n in cohort.names}, fitted_on)
    merged = (adapter.calibration or Calibration()).merged(fitted)
    return save_adapter(replace(adapter, calibration=merged), adapter_path), report


def _labelled_only(cohort: CohortScores, data: str | Path) -> CohortScores:
    """The findings some case of ``data`` has a label for: an adapter keeps the scalings it
    had for the others rather than gaining a fit on nothing."""
    cols = [j for j in range(len(cohort.names)) if (cohort.labels[:, j] >= 0).any()]
    if not cols:
        raise InputError(f"No case of {data} has a label for the findings being calibrated.")
    std = None if cohort.uncertainty_std is None else cohort.uncertainty_std[:, cols]
    return CohortScores([cohort.names[j] for j in cols], cohort.labels[:, cols], cohort.scores[:, cols],
                        cohort.probs[:, cols], cohort.uncertainty[:, cols], std)


def _adapted_findings(adapter, findings: list[str] | None, path: str | Path) -> list[str]:
    """``findings`` (default: all the adapter's), each one the adapter adapts, in its spelling."""
    from medalign.inference.adapter import finding_key

    known = {finding_key(f): f for f in adapter.findings}
    if findings is None:
        return list(adapter.findings)
    missing = [f for f in findings if finding_key(f) not in known]
    if missing:
        raise InputError(f"The adapter {path} does not adapt {', '.join(repr(f) for f in missing)} (it adapts "
                         f"{', '.join(adapter.findings)}); calibrate those with the model: medalign calibrate "
                         "without --adapter.")
    return [known[finding_key(f)] for f in findings]
