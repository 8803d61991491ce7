"""The structured screening report: per finding, definition -> appearance on CT ->
observations (where the map points) -> verdict with probability and uncertainty.

It lives in the engine so ``medalign screen --report`` and the Slicer panel's export write
the same files: report.json, report.csv and a self-contained report.html (every text
escaped). Where the map points is said in anatomical words when a segmentation of the scan
is given (a labelmap plus the names of its labels, e.g. TotalSegmentator's output, or a
Slicer segmentation's segment names): the structure under the hotspot, or the nearest one
within ``NEAREST_MM``. Without one, a position relative to the scanned region.
"""

from __future__ import annotations

import csv
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medalign.core.volume import Volume
from medalign.inference.results import FindingResult, ScreeningResult

REPORT_JSON = "report.json"
REPORT_CSV = "report.csv"
REPORT_HTML = "report.html"
NEAREST_MM = 10.0
# report wording of FindingResult.flag_state
VERDICTS = {"flagged": "flagged", "near chance": "not flagged: near chance on held-out data", "": "not flagged"}
REPORT_CSV_COLUMNS = [
    "finding", "verdict", "probability", "uncertainty", "validation_auc", "hotspot_r", "hotspot_a", "hotspot_s",
    "location", "structure", "extent_mm3", "map", "definition", "appearance",
]


@dataclass
class Segmentation:
    """A labelmap on any grid (voxel value = label) and the names of its labels; ``source``
    says where it came from (e.g. "segmentation 'TotalSegmentator'"), for the report."""

    labelmap: Volume
    names: dict[int, str]
    source: str = "segmentation"

    def structure_at(self, ras: tuple[float, float, float] | np.ndarray) -> tuple[str, float] | None:
        """(name, distance in mm) of the labelled structure at ``ras``, or of the nearest
        one within ``NEAREST_MM``; None when nothing named is that close."""
        arr, vol = self.labelmap.array, self.labelmap
        i, j, k = np.round(vol.ras_to_ijk_points(np.asarray(ras, dtype=np.float64)[None])[0]).astype(int)
        sp = np.asarray(vol.spacing, dtype=np.float64)  # along i, j, k
        r = np.ceil(NEAREST_MM / sp).astype(int)
        lo = np.maximum([k - r[2], j - r[1], i - r[0]], 0)
        hi = np.minimum([k + r[2] + 1, j + r[1] + 1, i + r[0] + 1], arr.shape)
        if np.any(hi <= lo):
            return None
        box = arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        kk, jj, ii = np.nonzero(np.isin(box, list(self.names)))
        if kk.size == 0:
            return None
        d = np.sqrt(((kk + lo[0] - k) * sp[2]) ** 2 + ((jj + lo[1] - j) * sp[1]) ** 2 + ((ii + lo[2] - i) * sp[0]) ** 2)
        best = int(np.argmin(d))
        if d[best] > NEAREST_MM:
            return None
        return self.names[int(box[kk[best], jj[best], ii[best]])], float(d[best])


def label_name(text: str) -> str:
    """A label's name as the report writes it: TotalSegmentator's "lung_upper_lobe_left"
    reads "lung upper lobe left" (label tables and Slicer segment names alike)."""
    return " ".join(text.replace("_", " ").split())


def read_label_names(path: str | Path) -> dict[int, str]:
    """Label names from a text table: one "value name [...]" per line (a Slicer colour
    table .txt/.ctbl, or TotalSegmentator's "id name" list); comments (#) skipped.
    CSV rows "value,name" work too."""
    from medalign.core.errors import InputError

    names: dict[int, str] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"Cannot read the label table {path} ({exc}).") from None
    for line in lines:
        parts = line.replace(",", " ").split()
        if not parts or parts[0].startswith("#") or not parts[0].isdigit() or len(parts) < 2:
            continue
        if int(parts[0]) != 0:
            names[int(parts[0])] = label_name(parts[1])
    if not names:
        raise InputError(f"The label table {path} names no label (expected lines like '5 liver').")
    return names


def describe_location(ras: tuple[float, float, float] | np.ndarray, bounds: tuple[np.ndarray, np.ndarray]) -> str:
    """Where a point lies within the scanned region, in patient terms (thirds of each axis).

    Honest about what is known without a segmentation: a position relative to the scan's
    extent (e.g. "patient-left, posterior, lower part of the scanned region").
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


def _knowledge(finding: FindingResult) -> tuple[str, str]:
    """(definition, appearance on CT) from the knowledge base; free text has neither."""
    from medalign.knowledge.findings import SYMPTOM_KEYS, find

    entry = find(finding.name)
    definition = str(finding.knowledge.get("definition") or (entry.definition if entry else ""))
    if entry is None:
        return definition, ""
    return definition, "; ".join(f"{k}: {entry.symptoms[k]}" for k in SYMPTOM_KEYS if entry.symptoms.get(k))


def _observations(finding: FindingResult, map_file: str | None, segmentation: Segmentation | None) -> dict[str, Any] | None:
    h = finding.hotspot
    if h is None:
        return None
    where = describe_location(h.ras, finding.map.ras_bounds()) if finding.map is not None else None
    structure = segmentation.structure_at(h.ras) if segmentation is not None else None
    if structure is not None:
        name, dist = structure
        where = f"in the {name}" if dist == 0 else f"{dist:.0f} mm from the {name}"
    return {
        "hotspot_ras": [round(float(v), 2) for v in h.ras],
        "location": where,
        "structure": structure[0] if structure else None,
        "peak_value": round(float(h.value), 6),
        "extent_mm3": round(float(h.extent_mm3), 1),
        "map": map_file if finding.map is not None else None,
    }


def finding_report(finding: FindingResult, map_file: str | None = None,
                   segmentation: Segmentation | None = None) -> dict[str, Any]:
    """One finding's entry: definition, appearance, observations, verdict (JSON-able)."""
    definition, appearance = _knowledge(finding)
    evidence = _observations(finding, map_file, segmentation)
    return {
        "finding": finding.name,
        "definition": definition,
        "appearance": appearance,
        "observations": evidence,
        "evidence": evidence,  # the name this entry had before the report was structured
        "verdict": VERDICTS[finding.flag_state],
        "validation_auc": finding.validation_auc,
        "probability": round(float(finding.probability), 4),
        "uncertainty": round(float(finding.uncertainty), 4),
    }


def report_dict(result: ScreeningResult, segmentation: Segmentation | None = None,
                anatomy_note: str | None = None) -> dict[str, Any]:
    """The whole report (JSON-able); ``anatomy_note`` is one sentence on the anatomy used,
    e.g. why an offered segmentation was not (it does not overlap the scan)."""
    files = result.map_files()
    return {
        "model": result.model,
        "device": result.device,
        "disclaimer": result.disclaimer,
        "warnings": list(result.warnings),
        "input": result.input,
        "anatomy_source": segmentation.source if segmentation is not None else "relative position in the scan",
        "anatomy_note": anatomy_note,
        "findings": [finding_report(f, files.get(f.name), segmentation) for f in result.ranked()],
    }


def report_csv(report: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=REPORT_CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for entry in report["findings"]:
        ev = entry["observations"] or {}
        ras = ev.get("hotspot_ras") or ["", "", ""]
        writer.writerow({
            "finding": entry["finding"], "verdict": entry["verdict"], "probability": entry["probability"],
            "uncertainty": entry["uncertainty"],
            "validation_auc": "" if entry["validation_auc"] is None else entry["validation_auc"],
            "hotspot_r": ras[0], "hotspot_a": ras[1], "hotspot_s": ras[2],
            "location": ev.get("location") or "", "structure": ev.get("structure") or "",
            "extent_mm3": ev.get("extent_mm3", ""), "map": ev.get("map") or "",
            "definition": entry["definition"], "appearance": entry["appearance"],
        })
    return buf.getvalue()


def report_html(report: dict[str, Any]) -> str:
    """A readable, self-contained page (no scripts, no external files); all text escaped."""
    e = html.escape
    rows = []
    for f in report["findings"]:
        ob = f["observations"]
        where = (e(ob["location"] or "") + f" (RAS {', '.join(f'{v:.0f}' for v in ob['hotspot_ras'])} mm)") if ob else ""
        rows.append(
            f"<section><h2>{e(f['finding'])}: {e(f['verdict'])}</h2><dl>"
            f"<dt>Definition</dt><dd>{e(f['definition']) or '&mdash;'}</dd>"
            f"<dt>Appearance on CT</dt><dd>{e(f['appearance']) or '&mdash;'}</dd>"
            f"<dt>Observations</dt><dd>{('map peaks ' + where) if ob else 'the map has no hotspot'}</dd>"
            f"<dt>Verdict</dt><dd>{e(f['verdict'])}: probability {f['probability']:.3f} "
            f"(uncertainty {f['uncertainty']:.3f} bits)</dd></dl></section>")
    notes = list(report["warnings"]) + ([report["anatomy_note"]] if report.get("anatomy_note") else [])
    warnings = "".join(f"<p class=w>{e(w)}</p>" for w in notes)
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>MedAlign screening report</title>"
            "<style>body{font:14px sans-serif;max-width:52em;margin:2em auto}section{border-top:1px solid #ccc}"
            "dt{font-weight:bold}.w{color:#a40}</style></head><body>"
            f"<h1>Screening report</h1><p>Model {e(str(report['model']))}; locations from "
            f"{e(report['anatomy_source'])}.</p>{warnings}{''.join(rows)}"
            f"<p><em>{e(report['disclaimer'] or '')}</em></p></body></html>\n")


def write_report(result: ScreeningResult, out_dir: str | Path, segmentation: Segmentation | None = None,
                 anatomy_note: str | None = None) -> dict[str, Any]:
    """report.json, report.csv and report.html into ``out_dir`` (atomically); the results
    and maps themselves are ``ScreeningResult.write``'s."""
    from medalign.core.atomic import write_text

    out = Path(out_dir)
    report = report_dict(result, segmentation, anatomy_note)
    write_text(out / REPORT_CSV, report_csv(report))
    write_text(out / REPORT_JSON, json.dumps(report, indent=2) + "\n")
    write_text(out / REPORT_HTML, report_html(report))
    return report
