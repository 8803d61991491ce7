"""Does the model's view of a scan look like a chest CT?  Warnings, not refusals.

``ctcheck`` refuses what is not a CT at all.  A CT of the abdomen or a thin slab is still
a CT, and the screener scores it, but chest findings on it are guesses: demo model 5
called pericardial effusion at 0.98 on an abdomen/pelvis scan.  So the result carries a
sentence the user sees next to the scores.

The test runs on the prepared model input (what the model actually sees after its crop)
and uses only the Hounsfield scale: lung parenchyma lies between -950 and -500 HU, body
tissue above -500 HU.  A slice "shows lung" when lung-range voxels make up at least
``LUNG_SLICE_FRACTION`` of its lung + body voxels.  Measured on the model grid of the demo
profile: chest CTs 0.88-1.0 of their slices, phantoms 0.72-0.80, the abdomen/pelvis CT
0.02.  A scan's blankets and table mattress also fall in the lung range; in a thin slab
they can fill a slice, which is why the head-to-foot extent is a check of its own.
"""

from __future__ import annotations

import numpy as np

from medalign.inference.preprocess import PreparedImage, hu_to_model_value

__all__ = ["coverage_warnings", "LUNG_SLICE_FRACTION", "MIN_LUNG_SLICES", "MIN_EXTENT_MM"]

LUNG_RANGE_HU = (-950.0, -500.0)
LUNG_SLICE_FRACTION = 0.15
MIN_LUNG_SLICES = 0.3  # of the slices that hold body
MIN_EXTENT_MM = 120.0  # head to foot; a whole chest is 250-350 mm
_MIN_BODY_MM2 = 5000.0  # a slice with less body than this (50 cm2) is an edge or a limb


def coverage_warnings(prepared: PreparedImage) -> list[str]:
    """Sentences saying why chest findings on this scan may be unreliable (empty when none)."""
    profile = prepared.profile
    x = prepared.tensor[0, 0].float().cpu().numpy()  # (X, Y, Z), channel 0 is the windowed HU
    lo, hi = (hu_to_model_value(v, profile) for v in LUNG_RANGE_HU)
    body = x > hi
    lung = (x > lo) & ~body
    sx, sy, sz = profile.spacing
    body_area = body.sum(axis=(0, 1)) * sx * sy
    lung_area = lung.sum(axis=(0, 1)) * sx * sy
    has_body = body_area >= _MIN_BODY_MM2
    if not has_body.any():
        return ["The scan shows almost no body tissue in the model's field of view; its scores mean little."]
    out = []
    extent = float(has_body.sum() * sz)
    if extent < MIN_EXTENT_MM:
        out.append(f"The scan covers only {extent:.0f} mm head to foot; the model was made for whole-chest CTs, "
                   f"so its scores on this slab are unreliable.")
    fraction = lung_area[has_body] / (lung_area[has_body] + body_area[has_body])
    shows_lung = float(np.mean(fraction >= LUNG_SLICE_FRACTION))
    if shows_lung < MIN_LUNG_SLICES:
        out.append(f"Only {100 * shows_lung:.0f}% of the scan's slices show lung: it may not be a chest CT, "
                   f"so chest findings' scores are unreliable.")
    return out
