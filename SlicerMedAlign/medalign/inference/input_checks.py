"""Is this volume a 3D CT in Hounsfield units? Refuse anything else with one sentence.

The models were trained on CT only, and their inputs are HU windows: an MR, a label map
or a raw-count image would produce confident nonsense. The intensity test uses the
physics of CT, not any particular file: Hounsfield units pin air at -1000 and water at
0, so a CT of a body holds air or lung (below -400 HU, outside the body, in the lungs
or bowel), a soft-tissue/fat/water cluster near 0, few voxels beyond dense metal, and
its non-air tissue sits around 0..100 HU. MR intensities are arbitrary positive
numbers with no air at -1000, so they fail the air test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medalign.core.errors import InputError
from medalign.core.volume import Volume

__all__ = ["check_ct", "MIN_SLICES"]

MIN_SLICES = 8

# Values below this are scanner padding outside the reconstruction circle (-1024,
# -2048, -3024 ...) and say nothing about the body; they are left out of the fractions.
_PADDING_BELOW = -1200.0
_AIR_MAX = -400.0  # air and lung parenchyma
_SOFT = (-150.0, 150.0)  # fat, water, soft tissue
_METAL_MIN = 3000.0
_MIN_AIR_FRACTION = 0.005
_MIN_SOFT_FRACTION = 0.02
_MAX_METAL_FRACTION = 0.02
_TISSUE_MEDIAN = (-250.0, 500.0)  # median of non-air voxels: tissue, contrast, bone
_MAX_LABELS = 160  # a segmentation holds a few small non-negative integers (TotalSegmentator: 117 classes)
_SAMPLE_VOXELS = 2_000_000  # the statistics use a regular subsample, bounded in time and memory


def _name(volume: Volume) -> str:
    path = volume.metadata.get("path") if isinstance(volume.metadata, dict) else None
    return Path(path).name if path else "The volume"


def _sample(array: np.ndarray) -> np.ndarray:
    """A strided view (no copy) with at most about ``_SAMPLE_VOXELS`` voxels."""
    step = max(1, int(np.ceil((array.size / _SAMPLE_VOXELS) ** (1.0 / 3.0))))
    return array[::step, ::step, ::step]


def check_ct(volume: Volume) -> None:
    """Raise ``InputError`` unless ``volume`` plausibly is a 3D CT in Hounsfield units.

    Checks, in order: 3D with at least ``MIN_SLICES`` along every axis; no NaN or
    infinity; a DICOM Modality, when known, of "CT"; not constant; not a label map;
    and an intensity distribution that follows the Hounsfield scale.
    """
    name = _name(volume)
    array = np.asarray(volume.array)
    if array.ndim != 3 or min(array.shape) <= 1:
        shape = "x".join(str(s) for s in array.shape[::-1])
        raise InputError(f"{name} is a 2D image ({shape}); MedAlign needs a 3D CT volume.")
    if min(array.shape) < MIN_SLICES:
        raise InputError(
            f"{name} has only {min(array.shape)} slices along one axis "
            f"(shape {'x'.join(str(s) for s in volume.shape_ijk)}); at least {MIN_SLICES} are needed for 3D screening."
        )
    if np.issubdtype(array.dtype, np.floating):
        # A float32 sum propagates NaN and turns +/-inf into inf or NaN; real HU sums never overflow.
        if not np.isfinite(np.add.reduce(array, axis=None, dtype=np.float32)):
            bad = "NaN" if np.isnan(array).any() else "infinite"
            raise InputError(f"{name} contains {bad} voxel values, so it cannot be screened.")
    elif not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{name} has voxels of type {array.dtype}, not numbers in Hounsfield units.")

    modality = str(volume.metadata.get("modality") or "").strip().upper()
    if modality and modality != "CT":
        raise InputError(
            f"{name} is a {modality} scan (DICOM Modality {modality}), not CT; MedAlign screens CT only."
        )

    sample = _sample(array)
    low, high = float(sample.min()), float(sample.max())
    if low == high:
        if float(array.min()) == float(array.max()):
            raise InputError(f"{name} has the same value ({low:g}) in every voxel; it holds no image.")
    if low >= -1.0 and high <= 1000.0:
        values = sample if np.issubdtype(sample.dtype, np.integer) else sample[sample == np.round(sample)]
        if values.size == sample.size:
            distinct = np.unique(values)
            if distinct.size <= _MAX_LABELS:
                raise InputError(
                    f"{name} looks like a label map or segmentation ({distinct.size} distinct integer values "
                    f"from {low:g} to {high:g}), not a CT scan; MedAlign screens CT only."
                )

    body = sample[sample >= _PADDING_BELOW]
    if body.size == 0:
        raise InputError(
            f"{name} does not look like a CT scan (every value is below {_PADDING_BELOW:g}, "
            "so intensities are not in Hounsfield units); MedAlign screens CT only."
        )
    air = float(np.count_nonzero(body <= _AIR_MAX)) / body.size
    soft = float(np.count_nonzero((body >= _SOFT[0]) & (body <= _SOFT[1]))) / body.size
    metal = float(np.count_nonzero(body > _METAL_MIN)) / body.size
    tissue = body[body > _AIR_MAX]
    median = float(np.median(tissue)) if tissue.size else float("nan")
    reason = None
    if air < _MIN_AIR_FRACTION:
        reason = (
            f"only {100 * air:.1f}% of voxels are air or lung ({_PADDING_BELOW:g} to {_AIR_MAX:g} HU), "
            f"values range from {low:g} to {high:g}"
        )
    elif soft < _MIN_SOFT_FRACTION:
        reason = f"only {100 * soft:.1f}% of voxels are fat, water or soft tissue ({_SOFT[0]:g} to {_SOFT[1]:g} HU)"
    elif metal > _MAX_METAL_FRACTION:
        reason = f"{100 * metal:.1f}% of voxels are above {_METAL_MIN:g}, denser than bone"
    elif not _TISSUE_MEDIAN[0] <= median <= _TISSUE_MEDIAN[1]:
        reason = f"the median of the non-air voxels is {median:g} instead of roughly 0 to 100 HU"
    if reason:
        raise InputError(
            f"{name} does not look like a CT scan (intensities are not in Hounsfield units: {reason}); "
            "MedAlign screens CT only."
        )
