"""The structured screening report for the Slicer side: the engine writes it
(``medalign.inference.report``: definition, appearance on CT, observations, verdict, as
JSON, CSV and HTML); this module only puts it beside the results and maps of one export
folder, so the panel's export and ``medalign screen --report`` write the same files."""

from __future__ import annotations

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


def export_report(result: ScreeningResult, out_dir: str | Path, segmentation: Segmentation | None = None) -> Path:
    """Write results.json/csv, maps/*.nii.gz, report.json, report.csv and report.html into
    ``out_dir``; ``segmentation`` names the structure under each hotspot."""
    out = Path(out_dir)
    result.write(out)
    write_report(result, out, segmentation)
    return out
