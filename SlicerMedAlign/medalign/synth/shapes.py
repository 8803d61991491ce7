"""Raster primitives of the phantoms, evaluated straight on the output voxel grid: the
grid itself, boxes, capsules (tapered tubes), ellipsoids, painting under a mask, and the
scanner-like 3-tap blur. Everything works inside a shape's bounding box only, which is
what keeps a phantom at a fraction of a second."""

from __future__ import annotations

import numpy as np

Slices = tuple[slice, slice, slice]


def smoothstep(x: np.ndarray | float) -> np.ndarray:
    """0 -> 1 ramp with zero slope at both ends (anatomical transitions are smooth)."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


class Grid:
    """The output voxel grid: ``array[k, j, i]`` at LPS ``origin + (i*sx, j*sy, k*sz)``."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float], origin: tuple[float, float, float]):
        self.shape = tuple(int(v) for v in shape)  # (nz, ny, nx)
        self.spacing = tuple(float(v) for v in spacing)  # (sx, sy, sz)
        self.origin = tuple(float(v) for v in origin)  # LPS of voxel (0, 0, 0)
        nz, ny, nx = self.shape
        sx, sy, sz = self.spacing
        x0, y0, z0 = self.origin
        self.x = (x0 + sx * np.arange(nx)).astype(np.float32)
        self.y = (y0 + sy * np.arange(ny)).astype(np.float32)
        self.z = (z0 + sz * np.arange(nz)).astype(np.float32)

    def axes(self, sl: Slices | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (z[:,None,None], y[None,:,None], x[None,None,:]) for a box."""
        if sl is None:
            sl = (slice(None),) * 3
        return (self.z[sl[0]][:, None, None], self.y[sl[1]][None, :, None], self.x[sl[2]][None, None, :])

    def box(self, lo: np.ndarray, hi: np.ndarray) -> Slices | None:
        """Voxel slices covering the LPS box [lo, hi] (xyz), clipped; None if outside."""
        lo = np.asarray(lo, dtype=np.float64)
        hi = np.asarray(hi, dtype=np.float64)
        out = []
        for axis, n in ((2, self.shape[0]), (1, self.shape[1]), (0, self.shape[2])):
            a = int(np.floor((lo[axis] - self.origin[axis]) / self.spacing[axis]))
            b = int(np.ceil((hi[axis] - self.origin[axis]) / self.spacing[axis])) + 1
            a, b = max(a, 0), min(b, n)
            if b <= a:
                return None
            out.append(slice(a, b))
        return tuple(out)  # type: ignore[return-value]

    def index(self, p: np.ndarray) -> tuple[int, int, int]:
        """Nearest voxel (k, j, i) of an LPS point, clipped into the grid."""
        i = int(np.clip(round((p[0] - self.origin[0]) / self.spacing[0]), 0, self.shape[2] - 1))
        j = int(np.clip(round((p[1] - self.origin[1]) / self.spacing[1]), 0, self.shape[1] - 1))
        k = int(np.clip(round((p[2] - self.origin[2]) / self.spacing[2]), 0, self.shape[0] - 1))
        return k, j, i

    def contains(self, p: np.ndarray) -> bool:
        lo = np.array(self.origin)
        hi = lo + np.array(self.spacing) * (np.array(self.shape[::-1]) - 1)
        return bool(np.all(p >= lo) and np.all(p <= hi))


def capsule(
    grid: Grid, p0: np.ndarray, p1: np.ndarray, r0: float, r1: float, pad: float = 0.0
) -> tuple[Slices, np.ndarray, np.ndarray] | None:
    """Distance to a tapered segment inside its bounding box: (slices, dist, radius).

    Tubes (aorta, bronchi, catheters, leads) are chains of these; callers threshold
    ``dist`` against ``radius`` (+ wall thickness) to paint lumen and wall.
    """
    p0 = np.asarray(p0, dtype=np.float32)
    p1 = np.asarray(p1, dtype=np.float32)
    rmax = max(r0, r1) + pad + max(grid.spacing)
    sl = grid.box(np.minimum(p0, p1) - rmax, np.maximum(p0, p1) + rmax)
    if sl is None:
        return None
    z, y, x = grid.axes(sl)
    d = p1 - p0
    l2 = float(d @ d) or 1e-6
    t = ((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / l2
    np.clip(t, 0.0, 1.0, out=t)
    dx = x - (p0[0] + t * d[0])
    dy = y - (p0[1] + t * d[1])
    dz = z - (p0[2] + t * d[2])
    dist = np.sqrt(dx * dx + dy * dy + dz * dz)
    radius = r0 + t * (r1 - r0)
    return sl, dist, radius


def ellipsoid(
    grid: Grid, center: np.ndarray, semi: np.ndarray, rot: np.ndarray | None = None, scale: float = 1.0
) -> tuple[Slices, np.ndarray] | None:
    """Normalised level ``sum((R (p - c) / semi)^2)`` in the box of the ellipsoid scaled by ``scale``.

    ``level < 1`` is inside; ``level < s^2`` is the ellipsoid grown by ``s`` (shells for
    pericardial fat or effusion reuse one evaluation).
    """
    center = np.asarray(center, dtype=np.float32)
    semi = np.asarray(semi, dtype=np.float32)
    rot = np.eye(3, dtype=np.float32) if rot is None else np.asarray(rot, dtype=np.float32)
    r = float(semi.max()) * scale + max(grid.spacing)
    sl = grid.box(center - r, center + r)
    if sl is None:
        return None
    z, y, x = grid.axes(sl)
    dx, dy, dz = x - center[0], y - center[1], z - center[2]
    level = np.zeros(np.broadcast_shapes(dz.shape, dy.shape, dx.shape), dtype=np.float32)
    for a in range(3):
        q = (rot[a, 0] * dx + rot[a, 1] * dy + rot[a, 2] * dz) / semi[a]
        level += q * q
    return sl, level


def rotation(yaw: float, pitch: float = 0.0) -> np.ndarray:
    """Rows are the local axes in LPS: yaw about z (axial plane), then pitch about local y."""
    cy, sy = np.cos(yaw), np.sin(yaw)
    cp, sp = np.cos(pitch), np.sin(pitch)
    rz = np.array([[cy, sy, 0], [-sy, cy, 0], [0, 0, 1]])
    ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    return (ry @ rz).astype(np.float32)


def paint(vol: np.ndarray, sl: Slices, mask: np.ndarray, value: float | np.ndarray) -> None:
    """Set ``vol[sl]`` to ``value`` where ``mask`` (broadcast to the box)."""
    sub = vol[sl]
    np.copyto(sub, np.asarray(value, dtype=np.float32), where=np.broadcast_to(mask, sub.shape))


def blur3(vol: np.ndarray, sigma: tuple[float, float, float], buf: np.ndarray | None = None) -> None:
    """In-place separable 3-tap Gaussian (sigma in voxels along k, j, i).

    The scanner's partial-volume blur at the output resolution is about one voxel wide,
    so three taps suffice; working in place with one scratch buffer (``buf``, same shape
    and dtype, reusable) makes it several times cheaper than ``scipy.ndimage``.
    """
    if buf is None:
        buf = np.empty_like(vol)
    for axis, s in enumerate(sigma):
        if s <= 0.2 or vol.shape[axis] < 3:
            continue
        w1 = float(np.exp(-0.5 / (s * s)))
        w0 = 1.0 / (1.0 + 2.0 * w1)
        w1 *= w0
        a = np.moveaxis(vol, axis, 0)
        b = np.moveaxis(buf, axis, 0)
        np.add(a[:-2], a[2:], out=b[1:-1])
        np.add(a[0], a[1], out=b[0])  # edges: nearest-neighbour replication
        np.add(a[-1], a[-2], out=b[-1])
        b *= np.float32(w1)
        a *= np.float32(w0)
        a += b
