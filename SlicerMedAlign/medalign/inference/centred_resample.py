"""torchio's ``Resample`` + ``CropOrPad`` recipe (COLIPRI's processor), reproduced on torch.

MONAI's ``Spacing`` + ``ResizeWithPadOrCrop`` (the other families) place the new grid and
treat its edges differently, which shifts a 2 mm grid by up to a voxel; parity with
COLIPRI needs torchio's rules, all of which come from SimpleITK:

* the resampled grid keeps the input's (reoriented) axes, has ``floor(n * s / S)`` voxels
  per axis and is centred on the input's centre; ``CropOrPad`` then crops or pads it to
  the target size, ``ceil(difference / 2)`` voxels at the start;
* linear interpolation clamps the sample position to the outermost voxel centres (ITK's
  ``LinearInterpolateImageFunction``: no blending with a pad value at the edge), in float64,
  lerping along x, then y, then z; positions more than half a voxel outside read 0 HU;
* the resampled image keeps the input's pixel type, so an integer CT is truncated towards
  zero (ITK's cast) before the clamp and rescale;
* padded voxels get the image minimum (the caller passes it as ``pad_hu``).
"""

from __future__ import annotations

import numpy as np
import torch

from medalign.core.volume import Volume

_SLAB_POINTS = 1 << 20  # sample positions per slab: bounds the float64 temporaries (~100 MB)


def _reoriented_axes(volume: Volume, axcodes: str, labels) -> tuple[np.ndarray, list[int], list[bool]]:
    """Per grid axis: unit direction after reorientation, the voxel axis it comes from, and
    whether that voxel axis runs backwards (torchio's ``ToOrientation``, via nibabel)."""
    from nibabel.orientations import axcodes2ornt, io_orientation

    affine = np.asarray(volume.ijk_to_ras, dtype=np.float64)
    start = io_orientation(affine)  # voxel axis -> (world axis, +-1)
    target = axcodes2ornt(axcodes, labels)  # grid axis -> (world axis, +-1)
    direction = affine[:3, :3] / np.asarray(volume.spacing, dtype=np.float64)
    columns, source_axes, flips = [], [], []
    for world, sign in target:
        p = int(np.flatnonzero(start[:, 0] == world)[0])
        flip = start[p, 1] * sign < 0
        columns.append(-direction[:, p] if flip else direction[:, p])
        source_axes.append(p)
        flips.append(bool(flip))
    return np.stack(columns, axis=1), source_axes, flips


def _reoriented_affine(volume: Volume, source_axes: list[int], flips: list[bool]) -> np.ndarray:
    """ijk -> RAS of the input after reorientation (same voxel centres, axes permuted/flipped)."""
    affine = np.asarray(volume.ijk_to_ras, dtype=np.float64)
    shape = volume.shape_ijk
    out = np.eye(4)
    corner = np.zeros(3)
    for a, (p, flip) in enumerate(zip(source_axes, flips)):
        out[:3, a] = -affine[:3, p] if flip else affine[:3, p]
        corner[p] = shape[p] - 1 if flip else 0
    out[:3, 3] = affine[:3, :3] @ corner + affine[:3, 3]
    return out


def centred_grid(
    volume: Volume, spacing: tuple[float, float, float], size: tuple[int, int, int], axcodes: str, labels
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(grid -> RAS affine of the final grid, per axis the index range the resampled grid covers).

    Outside that range the final grid holds padding.
    """
    direction, source_axes, _ = _reoriented_axes(volume, axcodes, labels)
    shape = np.asarray(volume.shape_ijk)
    src_spacing = np.asarray(volume.spacing, dtype=np.float64)
    new_spacing = np.asarray(spacing, dtype=np.float64)
    n = shape[source_axes]
    # the epsilon absorbs spacings recomputed from the affine (512 x 0.78125 / 2 is exactly 200)
    resampled = np.floor(n * src_spacing[source_axes] / new_spacing + 1e-6).astype(int)
    resampled[n == 1] = 1
    centre = volume.ijk_to_ras[:3, :3] @ ((shape - 1) / 2.0) + volume.ijk_to_ras[:3, 3]
    origin = centre - direction @ ((resampled - 1) / 2.0 * new_spacing)
    diff = np.asarray(size) - resampled
    shift = np.where(diff < 0, np.ceil(-diff / 2.0), -np.ceil(diff / 2.0)).astype(int)  # resampled index of voxel 0
    grid_to_ras = np.eye(4)
    grid_to_ras[:3, :3] = direction * new_spacing
    grid_to_ras[:3, 3] = origin + direction @ (shift * new_spacing)
    covered = [(max(0, -int(s)), min(int(t), int(m - s))) for s, t, m in zip(shift, size, resampled)]
    return grid_to_ras, covered


def _lerp_trilinear(flat: torch.Tensor, dims: list[int], strides: list[int], offset: int, idx: torch.Tensor) -> torch.Tensor:
    """ITK linear interpolation at continuous indices (N, 3) float64 of the reoriented image
    (``dims`` voxels per axis; voxel (a, b, c) sits at ``flat[offset + a*s0 + b*s1 + c*s2]``),
    positions clamped to the outermost voxel centres, lerping along axis 0, then 1, then 2."""
    upper = torch.tensor([n - 1 for n in dims], dtype=torch.float64, device=idx.device)
    pos = torch.minimum(idx.clamp_min(0.0), upper)
    base = pos.floor().clamp(max=(upper - 1).clamp_min(0))
    frac = pos - base
    start = offset + (base.to(torch.int64) * torch.tensor(strides, device=idx.device)).sum(dim=1)
    step = [strides[a] if dims[a] > 1 else 0 for a in range(3)]  # a singleton axis has no neighbour

    def at(da: int, db: int, dc: int) -> torch.Tensor:
        return flat[start + (da * step[0] + db * step[1] + dc * step[2])].to(torch.float64)

    def lerp(a: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return a + (c - a) * t

    fx, fy, fz = frac[:, 0], frac[:, 1], frac[:, 2]
    x00, x10 = lerp(at(0, 0, 0), at(1, 0, 0), fx), lerp(at(0, 1, 0), at(1, 1, 0), fx)
    x01, x11 = lerp(at(0, 0, 1), at(1, 0, 1), fx), lerp(at(0, 1, 1), at(1, 1, 1), fx)
    return lerp(lerp(x00, x10, fy), lerp(x01, x11, fy), fz)


def resample_centred(
    source: torch.Tensor,
    volume: Volume,
    grid_to_ras: np.ndarray,
    covered: list[tuple[int, int]],
    size: tuple[int, int, int],
    pad_hu: float,
    axcodes: str,
    labels,
) -> torch.Tensor:
    """(X, Y, Z) float32 HU on ``source``'s device: the input ([k, j, i] tensor) sampled onto the
    grid inside ``covered`` (truncated to integers for an integer CT), ``pad_hu`` elsewhere."""
    device = source.device
    out = torch.full(tuple(size), float(pad_hu), dtype=torch.float32, device=device)
    (x0, x1), (y0, y1), (z0, z1) = covered
    if x1 <= x0 or y1 <= y0 or z1 <= z0:
        return out
    _, source_axes, flips = _reoriented_axes(volume, axcodes, labels)
    reoriented = _reoriented_affine(volume, source_axes, flips)
    to_index = torch.as_tensor(np.linalg.inv(reoriented) @ grid_to_ras, dtype=torch.float64, device=device)
    shape = volume.shape_ijk
    ijk_strides = (1, shape[0], shape[0] * shape[1])  # source is [k, j, i], flattened
    dims = [shape[p] for p in source_axes]
    strides = [-ijk_strides[p] if f else ijk_strides[p] for p, f in zip(source_axes, flips)]
    offset = sum((shape[p] - 1) * ijk_strides[p] for p, f in zip(source_axes, flips) if f)
    flat = source.reshape(-1)
    ys = torch.arange(y0, y1, dtype=torch.float64, device=device)
    zs = torch.arange(z0, z1, dtype=torch.float64, device=device)
    per_x = (y1 - y0) * (z1 - z0)
    slab = max(1, _SLAB_POINTS // per_x)
    integer = not (source.is_floating_point() or source.is_complex())
    for xa in range(x0, x1, slab):
        xs = torch.arange(xa, min(x1, xa + slab), dtype=torch.float64, device=device)
        gx, gy, gz = torch.meshgrid(xs, ys, zs, indexing="ij")
        points = torch.stack((gx, gy, gz), dim=-1).reshape(-1, 3)
        idx = points @ to_index[:3, :3].T + to_index[:3, 3]
        values = _lerp_trilinear(flat, dims, strides, offset, idx)
        half = torch.tensor(dims, dtype=torch.float64, device=device) - 0.5
        inside = ((idx >= -0.5) & (idx <= half)).all(dim=1)
        values = torch.where(inside, values, torch.zeros((), dtype=torch.float64, device=device))
        if integer:
            values = values.trunc()
        out[xa : xa + xs.numel(), y0:y1, z0:z1] = values.to(torch.float32).reshape(xs.numel(), y1 - y0, z1 - z0)
    return out


__all__ = ["centred_grid", "resample_centred"]
