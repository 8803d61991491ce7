"""The one hotspot rule: where a finding's alignment map peaks and the region around it.

A map's values are "how much better the positive prompt matches this place than the
negative one"; only positive values are evidence for the finding.  A map with no positive
finite value (all NaN, all zero, all negative) points nowhere, so it has no hotspot:
inventing one at voxel (0, 0, 0) with an extent of litres would send a reader to a corner
of the scan for no reason.  The screener, the reports and the Slicer glue all call this
module, so a table row, an exported report and a segment never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medalign.core.volume import Volume
from medalign.inference.results import Hotspot

__all__ = ["HotspotRegion", "hotspot_of", "hotspot_region"]


@dataclass
class HotspotRegion:
    """The peak voxel ``index_kji`` (array order), its value, the threshold used, and the
    boolean ``mask`` of the connected voxels at or above it that contain the peak."""

    index_kji: tuple[int, int, int]
    peak: float
    threshold: float
    mask: np.ndarray


def hotspot_region(array: np.ndarray, fraction: float = 0.5, threshold: float | None = None) -> HotspotRegion | None:
    """The region around the highest positive finite value of ``array``; None when there is none.

    The region holds the voxels at or above ``threshold`` (default ``fraction`` x peak)
    that are face-connected to the peak; a threshold above the peak is lowered to it, so
    the region always contains the peak.  NaN and infinite voxels never belong to it.
    """
    array = np.asarray(array)
    if array.size == 0:
        return None
    finite = np.isfinite(array)
    values = np.where(finite, array, -np.inf) if not finite.all() else array
    flat = int(np.argmax(values))
    peak = float(values.flat[flat])
    if not peak > 0:
        return None
    index = tuple(int(n) for n in np.unravel_index(flat, array.shape))
    if threshold is None:
        threshold = peak * float(min(1.0, max(0.0, fraction)))
    threshold = min(float(threshold), peak)
    from scipy import ndimage

    labels, _count = ndimage.label(values >= threshold)
    return HotspotRegion(index_kji=index, peak=peak, threshold=threshold, mask=labels == labels[index])  # type: ignore[index]


def hotspot_of(map_volume: Volume, fraction: float = 0.5) -> Hotspot | None:
    """RAS of the map's positive peak, its value, and the volume of the connected region
    above ``fraction`` x peak; None for a map with no positive finite value."""
    region = hotspot_region(map_volume.array, fraction=fraction)
    if region is None:
        return None
    k, j, i = region.index_kji
    voxel_mm3 = float(np.prod(map_volume.spacing))
    ras = map_volume.ijk_to_ras_points(np.array([[i, j, k]]))[0]
    return Hotspot(
        ras=(float(ras[0]), float(ras[1]), float(ras[2])),
        value=region.peak,
        extent_mm3=int(region.mask.sum()) * voxel_mm3,
        threshold=region.threshold,
    )
