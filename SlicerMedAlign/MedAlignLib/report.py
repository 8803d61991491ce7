"""The structured screening report: per finding, what it is, where the evidence is, the verdict.

Written beside the engine's own results (results.json/csv and maps/*.nii.gz, through
``ScreeningResult.write``) so one export folder holds both the machine-readable result
and the human-oriented report. Every file is written atomically by the engine's helpers.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from medalign.inference.results import FindingResult, ScreeningResult

REPORT_JSON = "report.json"
REPORT_CSV = "report.csv"
# report.json wording of FindingResult.flag_state
VERDICTS = {"flagged": "flagged", "near chance": "not flagged: near chance on held-out data", "": "not flagged"}
REPORT_CSV_COLUMNS = [
    "finding", "verdict", "probability", "uncertainty", "validation_auc", "hotspot_r", "hotspot_a", "hotspot_s",
    "location", "extent_mm3", "map", "definition",
]


def describe_location(ras: tuple[float, float, float] | np.ndarray,
                      bounds: tuple[np.ndarray, np.ndarray]) -> str:
    """Where a point lies within the scanned region, in patient terms (thirds of each axis).

    This is honest about what is known without an anatomical atlas: a position relative to
    the scan's extent (e.g. "patient-left, posterior, lower part of the scanned region").
    """
    lo, hi = (np.asarray(b, dtype=np.float64) for b in bounds)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    rel = (np.asarray(ras, dtype=np.float64) - lo) / span
    words = []
    for value, (low, mid, high) in zip(rel, (
        ("patient-left", "midline", "patient-right"),  # +R is the patient's right
        ("posterior", "mid-coronal", "anterior"),
        ("lower", "middle", "upper"),
    )):
        words.append(low if value < 1 / 3 else high if value > 2 / 3 else mid)
    return f"{words[0]}, {words[1]}, {words[2]} part of the scanned region"


def _definition(finding: FindingResult) -> str:
    if finding.knowledge.get("definition"):
        return str(finding.knowledge["definition"])
    from medalign.knowledge.findings import find

    entry = find(finding.name)
    return entry.definition if entry is not None else ""


def finding_report(finding: FindingResult, map_file: str | None = None) -> dict[str, Any]:
    """One finding's report entry (JSON-able); ``map_file`` from ``ScreeningResult.map_files``."""
    evidence: dict[str, Any] | None = None
    if finding.hotspot is not None:
        h = finding.hotspot
        evidence = {
            "hotspot_ras": [round(float(v), 2) for v in h.ras],
            "location": describe_location(h.ras, finding.map.ras_bounds()) if finding.map is not None else None,
            "peak_value": round(float(h.value), 6),
            "extent_mm3": round(float(h.extent_mm3), 1),
            "map": map_file if finding.map is not None else None,
        }
    return {
        "finding": finding.name,
        "definition": _definition(finding),
        "verdict": VERDICTS[finding.flag_state],
        "validation_auc": finding.validation_auc,
        "probability": round(float(finding.probability), 4),
        "uncertainty": round(float(finding.uncertainty), 4),
        "evidence": evidence,
    }


def report_dict(result: ScreeningResult) -> dict[str, Any]:
    return {
        "model": result.model,
        "device": result.device,
        "disclaimer": result.disclaimer,
        "warnings": list(result.warnings),
        "input": result.input,
        "findings": [finding_report(f, result.map_files().get(f.name)) for f in result.ranked()],
    }


def report_csv(report: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=REPORT_CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for entry in report["findings"]:
        ev = entry["evidence"] or {}
        ras = ev.get("hotspot_ras") or ["", "", ""]
        writer.writerow({
            "finding": entry["finding"], "verdict": entry["verdict"], "probability": entry["probability"],
            "uncertainty": entry["uncertainty"],
            "validation_auc": "" if entry["validation_auc"] is None else entry["validation_auc"],
            "hotspot_r": ras[0], "hotspot_a": ras[1], "hotspot_s": ras[2],
            "location": ev.get("location") or "", "extent_mm3": ev.get("extent_mm3", ""), "map": ev.get("map") or "",
            "definition": entry["definition"],
        })
    return buf.getvalue()


def export_report(result: ScreeningResult, out_dir: str | Path) -> Path:
    """Write results.json/csv, maps/*.nii.gz, report.json and report.csv into ``out_dir``."""
    from medalign.core.atomic import write_text as atomic_write_text

    out = Path(out_dir)
    result.write(out)
    report = report_dict(result)
    atomic_write_text(out / REPORT_CSV, report_csv(report))
    atomic_write_text(out / REPORT_JSON, json.dumps(report, indent=2) + "\n")
    return out
