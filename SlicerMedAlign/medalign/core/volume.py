"""The one in-memory volume type shared by I/O, preprocessing, maps and the MRML glue."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Volume:
    """A scalar volume in Slicer's conventions.

    ``array`` is indexed ``[k, j, i]`` (slice, row, column), the order of
    ``slicer.util.arrayFromVolume`` and ``SimpleITK.GetArrayFromImage``, so the MRML
    glue can hand voxels over without copies. ``ijk_to_ras`` maps ``(i, j, k, 1)`` to
    RAS millimetres, exactly like ``vtkMRMLVolumeNode.GetIJKToRASMatrix``.
    CT values are Hounsfield units in float32 or int16 (never float64).
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=np.float64).reshape(4, 4)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k."""
        return tuple(float(v) for v in np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0))

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        k, j, i = self.array.shape
        return (i, j, k)

    def ijk_to_ras_points(self, ijk: np.ndarray) -> np.ndarray:
        """Map (N, 3) voxel indices (i, j, k) to (N, 3) RAS positions."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        return ijk @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]

    def ras_to_ijk_points(self, ras: np.ndarray) -> np.ndarray:
        """Map (N, 3) RAS positions to continuous (N, 3) voxel indices (i, j, k)."""
        ras = np.atleast_2d(np.asarray(ras, dtype=np.float64))
        inv = np.linalg.inv(self.ijk_to_ras)
        return ras @ inv[:3, :3].T + inv[:3, 3]

    def ras_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) RAS corner of the voxel-centre bounding box."""
        i, j, k = self.shape_ijk
        corners = np.array([[a, b, c] for a in (0, i - 1) for b in (0, j - 1) for c in (0, k - 1)])
        ras = self.ijk_to_ras_points(corners)
        return ras.min(axis=0), ras.max(axis=0)
