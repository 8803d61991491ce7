"""The structured screening report for the Slicer side: the engine writes it
(``medalign.inference.report``: definition, appearance on CT, observations, verdict, as
JSON, CSV and HTML); this module only puts it beside the results and maps of one export
folder, so the panel's export and ``medalign screen --report`` write the same files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from medalign.inference.report import (  # noqa: F401 -- re-exported for MedAlignLib's users
    REPORT_CSV,
    REPORT_CSV_COLUMNS,
    REPORT_HTML,
    REPORT_JSON,
    VERDICTS,
    Segmentation,
    describe_location,
    finding_report,
    report_csv,
    report_dict,
    write_report,
)

if TYPE_CHECKING:
    from medalign.inference.results import ScreeningResult


def export_report(result: ScreeningResult, out_dir: str | Path, segmentation: Segmentation | None = None,
                  anatomy_note: str | None = None) -> Path:
    """Write results.json/csv, maps/*.nii.gz, report.json, report.csv and report.html into
    ``out_dir``; ``segmentation`` names the structure under each hotspot, ``anatomy_note``
    is the report's sentence on the anatomy used (or why an offered one was not)."""
    out = Path(out_dir)
    result.write(out)
    write_report(result, out, segmentation, anatomy_note)
    return out


def export_summary(out_dir: str | Path) -> str:
    """What the panel's status says after an export, read back from the written report, so
    it can never claim another anatomy than the report's."""
    out = Path(out_dir)
    report = json.loads((out / REPORT_JSON).read_text(encoding="utf-8"))
    summary = f"Report written to {out}; locations from {report.get('anatomy_source')}."
    note = report.get("anatomy_note")
    return f"{summary} {note}" if note else summary
