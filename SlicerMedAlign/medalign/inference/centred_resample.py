"""torchio's ``Resample`` + ``CropOrPad`` recipe (COLIPRI's processor), reproduced on torch.

MONAI's ``Spacing`` + ``ResizeWithPadOrCrop`` (the other families) place the new grid and
treat its edges differently, which shifts a 2 mm grid by up to a voxel; parity with
COLIPRI needs torchio's rules, all of which come from SimpleITK:

* the resampled grid keeps the input's (reoriented) axes, has ``floor(n * s / S)`` voxels
  per axis and is centred on the input's centre; ``CropOrPad`` then crops or pads it to
  the target size, ``ceil(difference / 2)`` voxels at the start;
* sample positions follow ITK's arithmetic (``ResampleImageFilter``'s scan-line path: per
  output row the continuous input index of voxel 0 and of one past the end, and
  ``start + (x / n) * (end - start)`` between), so a position on a voxel centre comes out
  exactly there: with integer truncation (below) a position one ulp short turns 41 HU into 40;
* linear interpolation clamps the sample position to the outermost voxel centres (ITK's
  ``LinearInterpolateImageFunction``: no blending with a pad value at the edge), in float64,
  lerping along x, then y, then z; positions more than half a voxel outside read 0 HU;
* the resampled image keeps the input's pixel type, so an integer CT is truncated towards
  zero (ITK's cast) before the clamp and rescale;
* padded voxels get the image minimum (the caller passes it as ``pad_hu``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medalign.core.volume import Volume

_SLAB_POINTS = 1 << 20  # sample positions per slab: bounds the float64 temporaries (~100 MB)


@dataclass(frozen=True)
class Geometry:
    """An image grid as ITK holds it: origin, ``direction @ diag(spacing)`` and its inverse."""

    origin: np.ndarray
    matrix: np.ndarray
    inverse: np.ndarray

    @classmethod
    def of(cls, affine: np.ndarray) -> Geometry:
        return cls(affine[:3, 3].copy(), affine[:3, :3].copy(), np.linalg.inv(affine[:3, :3]))

    def point(self, index: np.ndarray) -> np.ndarray:
        """(..., 3) index -> mm, summed from the origin in index order (``TransformIndexToPhysicalPoint``)."""
        out = np.broadcast_to(self.origin, index.shape).copy()
        for j in range(3):
            out = out + self.matrix[:, j] * index[..., j : j + 1]
        return out

    def index(self, point: np.ndarray) -> np.ndarray:
        """(..., 3) mm -> continuous index, each row summed from 0 (``TransformPhysicalPointToContinuousIndex``)."""
        v = point - self.origin
        out = np.zeros_like(v)
        for j in range(3):
            out = out + self.inverse[:, j] * v[..., j : j + 1]
        return out


def _reoriented(volume: Volume, axcodes: str, labels) -> tuple[np.ndarray, list[int], list[bool]]:
    """torchio's ``ToOrientation`` (nibabel): the input's affine after reorientation, and per
    grid axis the voxel axis it comes from and whether that axis runs backwards."""
    from nibabel.orientations import axcodes2ornt, io_orientation

    affine = np.asarray(volume.ijk_to_ras, dtype=np.float64)
    start = io_orientation(affine)  # voxel axis -> (world axis, +-1)
    target = axcodes2ornt(axcodes, labels)  # grid axis -> (world axis, +-1)
    out, corner = np.eye(4), np.zeros(3)
    source_axes, flips = [], []
    for a, (world, sign) in enumerate(target):
        p = int(np.flatnonzero(start[:, 0] == world)[0])
        flip = bool(start[p, 1] * sign < 0)
        out[:3, a] = -affine[:3, p] if flip else affine[:3, p]
        corner[p] = volume.shape_ijk[p] - 1 if flip else 0
        source_axes.append(p)
        flips.append(flip)
    out[:3, 3] = affine[:3, :3] @ corner + affine[:3, 3]
    return out, source_axes, flips


@dataclass(frozen=True)
class CentredGrid:
    """Where torchio's recipe puts the model grid.

    ``grid_to_ras``: the final (cropped/padded) grid; ``resampled``: the floor-size grid
    torchio resamples onto (``resampled_size`` voxels); final index + ``shift`` = resampled
    index; ``covered``: per axis the final index range inside the resampled grid (padding
    elsewhere); ``source``: the reoriented input.
    """

    grid_to_ras: np.ndarray
    resampled: Geometry
    resampled_size: np.ndarray
    shift: np.ndarray
    covered: list[tuple[int, int]]
    source: Geometry


def centred_grid(
    volume: Volume, spacing: tuple[float, float, float], size: tuple[int, int, int], axcodes: str, labels
) -> CentredGrid:
    """torchio's ``Resample(target=spacing)`` grid (``get_reference_image``), then ``CropOrPad(size)``."""
    reoriented, source_axes, _ = _reoriented(volume, axcodes, labels)
    source = Geometry.of(reoriented)
    n = np.asarray(volume.shape_ijk)[source_axes]
    src_spacing = np.sqrt((reoriented[:3, :3] ** 2).sum(axis=0))
    direction = reoriented[:3, :3] / src_spacing
    new_spacing = np.asarray(spacing, dtype=np.float64)
    # the epsilon absorbs spacings recomputed from the affine (512 x 0.78125 / 2 is exactly 200)
    resampled = np.floor(n * src_spacing / new_spacing + 1e-6).astype(int)
    resampled[n == 1] = 1
    centre = (source.point((n - 1).astype(np.float64)) + source.origin) / 2
    affine = np.eye(4)
    affine[:3, :3] = direction * new_spacing
    affine[:3, 3] = centre - direction @ ((resampled - 1) / 2 * new_spacing)
    diff = np.asarray(size) - resampled
    shift = np.where(diff < 0, np.ceil(-diff / 2.0), -np.ceil(diff / 2.0)).astype(int)  # resampled index of voxel 0
    grid_to_ras = affine.copy()
    grid_to_ras[:3, 3] = affine[:3, 3] + direction @ (shift * new_spacing)
    covered = [(max(0, -int(s)), min(int(t), int(m - s))) for s, t, m in zip(shift, size, resampled)]
    return CentredGrid(grid_to_ras, Geometry.of(affine), resampled, shift, covered, source)


def _lerp_trilinear(flat: torch.Tensor, dims: list[int], strides: list[int], offset: int, idx: torch.Tensor) -> torch.Tensor:
    """ITK linear interpolation at continuous indices (N, 3) float64 of the reoriented image
    (``dims`` voxels per axis; voxel (a, b, c) sits at ``flat[offset + a*s0 + b*s1 + c*s2]``),
    positions clamped to the outermost voxel centres, lerping along axis 0, then 1, then 2."""
    upper = torch.tensor([n - 1 for n in dims], dtype=torch.float64, device=idx.device)
    pos = torch.minimum(idx.clamp_min(0.0), upper)
    base = pos.floor()
    frac = pos - base  # 0 on the last voxel centre: its value exactly, as ITK returns it
    b = base.to(torch.int64)
    s = torch.tensor(strides, device=idx.device)
    start = offset + (b * s).sum(dim=1)
    # the upper neighbour, or the voxel itself on the last centre (ITK clamps it to the image)
    step = [torch.where(b[:, a] < dims[a] - 1, s[a], torch.zeros_like(s[a])) for a in range(3)]

    def at(da: int, db: int, dc: int) -> torch.Tensor:
        return flat[start + (da * step[0] + db * step[1] + dc * step[2])].to(torch.float64)

    def lerp(a: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return a + (c - a) * t

    fx, fy, fz = frac[:, 0], frac[:, 1], frac[:, 2]
    x00, x10 = lerp(at(0, 0, 0), at(1, 0, 0), fx), lerp(at(0, 1, 0), at(1, 1, 0), fx)
    x01, x11 = lerp(at(0, 0, 1), at(1, 0, 1), fx), lerp(at(0, 1, 1), at(1, 1, 1), fx)
    return lerp(lerp(x00, x10, fy), lerp(x01, x11, fy), fz)


def _row_ends(grid: CentredGrid, ys: np.ndarray, zs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous source index of resampled voxel 0 and of one past the end of each (y, z) row."""
    gy, gz = np.meshgrid(ys, zs, indexing="ij")
    first = np.stack([np.zeros_like(gy), gy, gz], axis=-1).reshape(-1, 3)
    last = first.copy()
    last[:, 0] = grid.resampled_size[0]
    start = grid.source.index(grid.resampled.point(first))
    end = grid.source.index(grid.resampled.point(last))
    return torch.from_numpy(start), torch.from_numpy(end - start)


def resample_centred(
    source: torch.Tensor,
    volume: Volume,
    grid: CentredGrid,
    size: tuple[int, int, int],
    pad_hu: float,
    axcodes: str,
    labels,
) -> torch.Tensor:
    """(X, Y, Z) float32 HU on ``source``'s device: the input ([k, j, i] tensor) sampled onto the
    grid inside ``grid.covered`` (truncated to integers for an integer CT), ``pad_hu`` elsewhere."""
    device = source.device
    out = torch.full(tuple(size), float(pad_hu), dtype=torch.float32, device=device)
    (x0, x1), (y0, y1), (z0, z1) = grid.covered
    if x1 <= x0 or y1 <= y0 or z1 <= z0:
        return out
    _, source_axes, flips = _reoriented(volume, axcodes, labels)
    shape = volume.shape_ijk
    ijk_strides = (1, shape[0], shape[0] * shape[1])  # source is [k, j, i], flattened
    dims = [shape[p] for p in source_axes]
    strides = [-ijk_strides[p] if f else ijk_strides[p] for p, f in zip(source_axes, flips)]
    offset = sum((shape[p] - 1) * ijk_strides[p] for p, f in zip(source_axes, flips) if f)
    flat = source.reshape(-1)
    sx, sy, sz = (int(v) for v in grid.shift)
    start, vector = _row_ends(grid, np.arange(y0, y1) + sy, np.arange(z0, z1) + sz)
    start, vector = start.to(device), vector.to(device)
    limit = torch.tensor(dims, dtype=torch.float64, device=device) - 0.5
    integer = not (source.is_floating_point() or source.is_complex())
    slab = max(1, _SLAB_POINTS // start.shape[0])
    for xa in range(x0, x1, slab):
        xb = min(x1, xa + slab)
        alpha = torch.arange(xa + sx, xb + sx, dtype=torch.float64, device=device) / float(grid.resampled_size[0])
        idx = (start[None] + alpha[:, None, None] * vector[None]).reshape(-1, 3)
        values = _lerp_trilinear(flat, dims, strides, offset, idx)
        inside = ((idx >= -0.5) & (idx < limit)).all(dim=1)
        values = torch.where(inside, values, torch.zeros((), dtype=torch.float64, device=device))
        if integer:
            values = values.trunc()
        out[xa:xb, y0:y1, z0:z1] = values.to(torch.float32).reshape(xb - xa, y1 - y0, z1 - z0)
    return out


__all__ = ["CentredGrid", "Geometry", "centred_grid", "resample_centred"]
