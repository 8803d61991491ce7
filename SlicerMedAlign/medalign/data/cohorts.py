"""CT + report cohorts on disk, as training and evaluation read them.

A cohort folder holds ``volumes/<id>.<ext>`` and ``reports.csv`` (``VolumeName,
report_text``); ``labels.csv`` (``VolumeName`` + one 0/1 column per finding) and
``masks/<id>.nii.gz`` (bit f = finding f of CT_RATE_FINDINGS) are optional.  Phantom sets
from ``medalign phantoms`` have exactly this layout; a researcher's own cohort only needs
volumes and reports (labels are then read from the reports).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from medalign.core.errors import InputError
from medalign.core.volume_io import VOLUME_SUFFIXES
from medalign.core.volume_io import strip_volume_suffix as _strip_suffix


@dataclass
class Case:
    case_id: str
    volume_path: Path
    report: str | None
    labels: dict[str, int] | None
    mask_path: Path | None


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# Columns naming the case in reports.csv / labels.csv (CT-RATE uses either), first wins.
ID_COLUMNS = ("VolumeName", "AccessionNo")


def _case_id(row: dict[str, str]) -> str:
    """The row's case id; the id columns are removed so only finding columns remain."""
    ids = [row.pop(c, "") or "" for c in ID_COLUMNS]
    return _strip_suffix(next((v for v in ids if v), ""))


def load_cohort(folder: str | Path, require_reports: bool = False) -> list[Case]:
    """List a cohort's cases in a stable order; clear errors for a malformed folder."""
    root = Path(folder)
    vol_dir = root / "volumes"
    if not vol_dir.is_dir():
        raise InputError(f"{root} is not a cohort folder (expected a 'volumes/' sub-folder).")
    volumes = {}
    for p in sorted(vol_dir.iterdir()):
        if p.name.lower().endswith(VOLUME_SUFFIXES) or p.is_dir():
            volumes[_strip_suffix(p.name)] = p
    if not volumes:
        raise InputError(f"{vol_dir} holds no CT volumes (.nii.gz, .nrrd, .mha or DICOM folders).")
    reports = {}
    if (root / "reports.csv").is_file():
        for row in _read_csv(root / "reports.csv"):
            reports[_case_id(row)] = row.get("report_text", "")
    elif require_reports:
        raise InputError(f"{root} has no reports.csv (columns VolumeName, report_text).")
    labels = {}
    if (root / "labels.csv").is_file():
        for row in _read_csv(root / "labels.csv"):
            key = _case_id(row)
            labels[key] = {k: int(float(v)) for k, v in row.items() if v not in ("", None)}
    cases = []
    for cid, path in volumes.items():
        mask = root / "masks" / f"{cid}.nii.gz"
        cases.append(Case(cid, path, reports.get(cid), labels.get(cid), mask if mask.is_file() else None))
    if require_reports and not any(c.report for c in cases):
        raise InputError(f"No report in {root / 'reports.csv'} matches a volume in {vol_dir}.")
    return cases
