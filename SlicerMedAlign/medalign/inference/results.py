"""Screening results: plain data that the CLI, the Slicer glue and the web viewer share.

``ScreeningResult.write`` is the one place that decides the on-disk layout
(results.json, results.csv, maps/<name>.nii.gz, the map's file name recorded per finding);
``ScreeningResult.read`` reverses it so a background process can hand results to the
Slicer module. Results and maps always belong together: a rerun replaces both.
"""

from __future__ import annotations

import csv
import io as _io
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medalign.core.volume import Volume

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
MAPS_DIR = "maps"
CSV_COLUMNS = [
    "finding", "probability", "uncertainty", "flagged", "threshold", "validation_auc", "score",
    "hotspot_r", "hotspot_a", "hotspot_s", "hotspot_value", "extent_mm3", "map",
]

# Below this held-out AUC a finding is reported but never flagged: its flags would be
# close to coin tosses (0.7 is the usual floor of "acceptable" discrimination).
MIN_FLAG_AUC = 0.7


def is_near_chance(validation_auc: float | None) -> bool:
    """A finding was validated and its held-out AUC is below ``MIN_FLAG_AUC``."""
    return validation_auc is not None and validation_auc < MIN_FLAG_AUC


def slug(name: str) -> str:
    """File-system-safe name of a finding (shared with the knowledge base); may be empty
    (non-Latin names) or shared by two names, so map files use ``map_file_names``."""
    from medalign.knowledge.findings import slugify

    return slugify(name)


def map_file_names(names: list[str]) -> dict[str, str]:
    """Finding name -> ``maps/<file>.nii.gz``, unique and safe for any set of names
    ("Lung nodule" and "lung-nodule", or 肺结节, each get their own file)."""
    from medalign.core.output_folder import unique_names

    return {n: f"{MAPS_DIR}/{b}.nii.gz" for n, b in unique_names(names, slug).items()}


@dataclass
class Hotspot:
    """Where a finding's map peaks: RAS of the peak and the size of the region around it."""

    ras: tuple[float, float, float]
    value: float
    extent_mm3: float
    threshold: float


@dataclass
class FindingResult:
    name: str
    probability: float
    uncertainty: float
    flagged: bool
    score: float  # logit difference positive - negative (model units)
    map: Volume | None = None
    hotspot: Hotspot | None = None
    knowledge: dict[str, Any] = field(default_factory=dict)
    published_score: float | None = None  # the family's own score where it has one (BrgSA)
    validation_auc: float | None = None  # the model's AUC for this finding on its held-out set, if known
    threshold: float | None = None  # flagged = probability >= threshold (and not near chance)
    uncertainty_std: float | None = None  # spread of the ensemble members' probabilities (inference.uncertainty)

    @property
    def near_chance(self) -> bool:
        """The model was validated for this finding and barely tells cases apart."""
        return is_near_chance(self.validation_auc)

    @property
    def flag_state(self) -> str:
        """"flagged", "near chance" (never flagged) or "": the one word every front end shows."""
        return "flagged" if self.flagged else "near chance" if self.near_chance else ""

    def to_dict(self, map_file: str | None = None) -> dict[str, Any]:
        """JSON-able; ``map_file`` is where ``ScreeningResult.write`` puts the map."""
        d = {
            "name": self.name,
            "probability": round(float(self.probability), 6),
            "uncertainty": round(float(self.uncertainty), 6),
            "flagged": bool(self.flagged),
            "threshold": None if self.threshold is None else round(float(self.threshold), 6),
            "validation_auc": None if self.validation_auc is None else round(float(self.validation_auc), 4),
            "score": round(float(self.score), 6),
            "hotspot": None if self.hotspot is None else _round_hotspot(self.hotspot),
            "map": map_file if self.map is not None else None,
        }
        if self.knowledge:
            d["knowledge"] = self.knowledge
        if self.published_score is not None:
            d["published_score"] = round(float(self.published_score), 6)
        if self.uncertainty_std is not None:
            d["uncertainty_std"] = round(float(self.uncertainty_std), 6)
        return d


def _round_hotspot(h: Hotspot) -> dict[str, Any]:
    d = asdict(h)
    d["ras"] = [round(float(v), 3) for v in h.ras]
    d["value"], d["extent_mm3"], d["threshold"] = (round(float(d[k]), 6) for k in ("value", "extent_mm3", "threshold"))
    return d


@dataclass
class ScreeningResult:
    input: dict[str, Any]
    model: str
    device: str
    findings: list[FindingResult]
    elapsed_s: float = 0.0
    disclaimer: str = ""
    warnings: list[str] = field(default_factory=list)  # why these scores may not apply to this scan
    settings: dict[str, Any] = field(default_factory=dict)  # what produced it (model, findings, maps): reuse test

    def ranked(self) -> list[FindingResult]:
        return sorted(self.findings, key=lambda f: f.probability, reverse=True)

    def finding(self, name: str) -> FindingResult:
        for f in self.findings:
            if f.name.lower() == name.lower():
                return f
        raise KeyError(name)

    def map_files(self) -> dict[str, str]:
        """Finding name -> its map's path relative to the results folder (findings with maps)."""
        return map_file_names([f.name for f in self.findings if f.map is not None])

    def to_dict(self) -> dict[str, Any]:
        files = self.map_files()
        return {
            "input": self.input,
            "model": self.model,
            "device": self.device,
            "elapsed_s": round(float(self.elapsed_s), 3),
            "disclaimer": self.disclaimer,
            "warnings": list(self.warnings),
            "settings": dict(self.settings),
            "findings": [f.to_dict(files.get(f.name)) for f in self.ranked()],
        }

    def csv_text(self) -> str:
        buf = _io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        files = self.map_files()
        for f in self.ranked():
            d = f.to_dict(files.get(f.name))
            h = f.hotspot
            writer.writerow({
                "finding": f.name, "probability": d["probability"], "uncertainty": d["uncertainty"],
                "flagged": int(f.flagged), "threshold": "" if f.threshold is None else d["threshold"],
                "validation_auc": "" if f.validation_auc is None else d["validation_auc"],
                "score": d["score"],
                "hotspot_r": "" if h is None else round(h.ras[0], 3),
                "hotspot_a": "" if h is None else round(h.ras[1], 3),
                "hotspot_s": "" if h is None else round(h.ras[2], 3),
                "hotspot_value": "" if h is None else round(h.value, 6),
                "extent_mm3": "" if h is None else round(h.extent_mm3, 3),
                "map": d["map"] or "",
            })
        return buf.getvalue()

    def write(self, out_dir: str | Path) -> Path:
        """Write results.json, results.csv and maps/*.nii.gz as one set.

        The maps are written into a temporary folder that then replaces ``maps/`` whole,
        so maps of findings no longer screened (or of an earlier run with maps) never sit
        beside the new results; results.json is removed first and written last, so its
        presence means the whole set is complete.
        """
        from medalign.core.atomic import replace_folder, temp_name, write_text
        from medalign.core.output_folder import inside
        from medalign.core.volume_io import write_volume

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = self.map_files()
        staged = temp_name(out / MAPS_DIR)
        try:
            if files:
                staged.mkdir()
                for f in self.findings:
                    if f.name in files:
                        write_volume(f.map, inside(staged, Path(files[f.name]).name))
            (out / RESULTS_JSON).unlink(missing_ok=True)  # the old set stops counting as complete
            replace_folder(staged if files else None, out / MAPS_DIR)
        finally:
            if staged.exists():
                shutil.rmtree(staged, ignore_errors=True)
        write_text(out / RESULTS_CSV, self.csv_text())
        write_text(out / RESULTS_JSON, json.dumps(self.to_dict(), indent=2) + "\n")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], map_of: Callable[[dict], Volume | None] | None = None) -> ScreeningResult:
        """Inverse of ``to_dict``; ``map_of(finding_dict)`` supplies each map (file, MRML node ...)."""
        findings = []
        for d in data["findings"]:
            h = d.get("hotspot")
            hotspot = None if h is None else Hotspot(tuple(h["ras"]), h["value"], h["extent_mm3"], h["threshold"])
            findings.append(FindingResult(
                d["name"], d["probability"], d["uncertainty"], d["flagged"], d["score"],
                map_of(d) if map_of is not None else None, hotspot, d.get("knowledge", {}), d.get("published_score"),
                d.get("validation_auc"), d.get("threshold"),  # absent in results written before they existed
                d.get("uncertainty_std"),
            ))
        return cls(data.get("input", {}), data["model"], data["device"], findings, data.get("elapsed_s", 0.0),
                   data.get("disclaimer", ""), list(data.get("warnings", [])), dict(data.get("settings", {})))

    @classmethod
    def read(cls, out_dir: str | Path, load_maps: bool = True) -> ScreeningResult:
        from medalign.core.errors import InputError
        from medalign.core.output_folder import inside
        from medalign.core.volume_io import read_volume

        out = Path(out_dir)
        path = out / RESULTS_JSON
        if not path.is_file():
            raise InputError(f"No {RESULTS_JSON} in {out}: the screening did not finish.")

        def map_of(d: dict) -> Volume | None:
            if not (load_maps and d.get("map")):
                return None
            vol = read_volume(inside(out, d["map"]))
            if vol.array.dtype != np.float32:
                vol.array = vol.array.astype(np.float32)
            return vol

        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")), map_of)
