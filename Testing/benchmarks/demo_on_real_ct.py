"""What a model says on the shared real CTs (not a test: a report for the model card).

For each CT under ../shared/data/real_ct: the CT check, the top findings, and for the
Lung-PET-CT-Dx case whether the lung-nodule / lung-mass map peaks inside the expert's box.

    python Testing/benchmarks/demo_on_real_ct.py [--model medalign-demo] [--weights CKPT] [--shared ../shared]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from medalign.core.errors import MedAlignError
from medalign.core.volume_io import read_volume
from medalign.inference.screener import Screener
from medalign.models import load

CASES = ["chest_ct_lung_mass.nii.gz", "chest_cta_mediastinum_crop.nii.gz", "abdomen_ct_3mm.nii.gz", "abdomen_ct_dicom", "mr_not_ct.nii.gz"]


def peak_in_box(result, finding: str, box: dict) -> tuple[bool, list[float], float]:
    f = result.finding(finding)
    if f.hotspot is None:  # the map has no positive value: it points nowhere, a miss
        return False, [], float("inf")
    ras = np.asarray(f.hotspot.ras)
    lo, hi = np.asarray(box["ras_box_mm"]["min"]), np.asarray(box["ras_box_mm"]["max"])
    centre = np.asarray(box["ras_center_mm"])
    return bool(np.all(ras >= lo) and np.all(ras <= hi)), [round(float(v), 1) for v in ras], float(np.linalg.norm(ras - centre))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="registry name (default: medalign-demo)")
    ap.add_argument("--weights", default=None, type=Path, help="a checkpoint of the model's family, e.g. a new demo model")
    ap.add_argument("--shared", default=os.environ.get("MEDALIGN_SHARED", str(Path(__file__).resolve().parents[2].parent / "shared")))
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    real = Path(args.shared) / "data" / "real_ct"
    findings = "ct-rate;Lung mass"
    model = args.model
    if args.weights is not None:
        model = load(args.model or "medalign-demo", weights=args.weights)
    screener = Screener(model=model, findings=findings, device=args.device)
    report = {}
    for name in CASES:
        path = real / name
        try:
            result = screener(read_volume(path))
        except MedAlignError as exc:
            print(f"{name}: refused: {exc}")
            report[name] = {"refused": str(exc)}
            continue
        top = result.ranked()[:5]
        # * flagged; (n/c) near chance on held-out data, so never flagged
        marks = {"flagged": "*", "near chance": " (n/c)", "": ""}
        print(f"{name}: " + ", ".join(f"{f.name} {f.probability:.2f}{marks[f.flag_state]}" for f in top))
        for warning in result.warnings:
            print(f"   warning: {warning}")
        entry = {"top5": [(f.name, round(f.probability, 3), f.flagged) for f in top], "warnings": result.warnings}
        if name == "chest_ct_lung_mass.nii.gz":
            box = json.loads((real / "chest_ct_lung_mass.boxes.json").read_text(encoding="utf-8"))
            for finding in ("Lung nodule", "Lung mass"):
                inside, ras, dist = peak_in_box(result, finding, box)
                p = result.finding(finding).probability
                print(f"   {finding}: p={p:.3f}, map peak at RAS {ras}: {'INSIDE' if inside else 'outside'} the expert box "
                      f"({dist:.0f} mm from its centre)")
                entry[finding] = {"probability": round(p, 3), "peak_ras": ras, "inside_box": inside,
                                  "distance_to_box_centre_mm": round(dist, 1)}
        report[name] = entry
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
