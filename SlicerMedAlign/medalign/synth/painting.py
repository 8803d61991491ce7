"""The painting context shared by every finding: the anatomy being painted, the finding
bitmask, the lung voxels no longer free, and helpers several findings use (a lung point,
smooth noise, irregular blobs, tubes, metal streaks).

A finding's painter (``medalign.synth.findings``) changes ``hu`` in place, sets its bit
in ``mask`` wherever it painted and returns the facts its report sentence needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medalign.knowledge.findings import CT_RATE_FINDINGS
from medalign.synth.anatomy import Anatomy
from medalign.synth.shapes import capsule, ellipsoid, paint

#: Bit of each finding in a phantom's int32 mask (CT-RATE order).
BIT = {name: 1 << i for i, name in enumerate(CT_RATE_FINDINGS)}


class PaintContext:
    """Mutable state while findings are painted onto one anatomy."""

    def __init__(self, anat: Anatomy, rng: np.random.Generator) -> None:
        self.anat = anat
        self.rng = rng
        self.grid = anat.grid
        self.hu = anat.hu
        self.mask = np.zeros(anat.grid.shape, dtype=np.int32)
        self.blocked = np.zeros(anat.grid.shape, dtype=bool)  # lung no longer free (fluid)
        self._lung_idx = np.flatnonzero(anat.lung)

    # -- geometry helpers --
    def ras(self, p: np.ndarray) -> list[float]:
        q = np.asarray(p, dtype=np.float64)
        return [round(-float(q[0]), 2), round(-float(q[1]), 2), round(float(q[2]) + self.anat.p["z_table"], 2)]

    def mark(self, name: str, sl: tuple[slice, slice, slice] | None, m: np.ndarray | None, block: bool = False) -> None:
        """Set the finding's bit where ``m``; ``block`` keeps later focal findings off
        these voxels so every mask still shows its own finding in the final image."""
        if sl is None or m is None:
            return
        mb = np.broadcast_to(m, self.mask[sl].shape)
        sub = self.mask[sl]
        sub |= np.where(mb, np.int32(BIT[name]), np.int32(0))
        if block:
            self.blocked[sl] |= mb

    def has(self, name: str) -> bool:
        return bool(np.any(self.mask & BIT[name]))

    def force(self, name: str, p: np.ndarray, value: float | None = None) -> None:
        """Guarantee a non-empty mask: tiny lesions still own their nearest voxel."""
        k, j, i = self.grid.index(p)
        self.mask[k, j, i] |= BIT[name]
        self.blocked[k, j, i] |= self.anat.lung[k, j, i] > 0
        if value is not None:
            self.hu[k, j, i] = value

    def lung_point(self, side: int | None = None, margin: float = 0.0, zone: str | None = None, tries: int = 200) -> np.ndarray | None:
        """A random free lung point at least ``margin`` mm from the lung edge (axis probes)."""
        rng, g, lung = self.rng, self.grid, self.anat.lung
        H = self.anat.p["H"]
        idx = self._lung_idx
        if idx.size == 0:
            return None
        for attempt in range(tries):
            f = int(idx[rng.integers(idx.size)])
            k, j, i = np.unravel_index(f, g.shape)
            if side is not None and lung[k, j, i] != side:
                continue
            if self.blocked[k, j, i]:
                continue
            p = np.array([g.x[i], g.y[j], g.z[k]], dtype=np.float64)
            s = -p[2] / H
            if zone == "upper" and s > 0.5 and attempt < tries // 2:
                continue
            if zone == "lower" and s < 0.55 and attempt < tries // 2:
                continue
            m = margin * (1.0 - attempt / tries)  # relax the margin when the lung is small
            ok = True
            for d in ((m, 0, 0), (-m, 0, 0), (0, m, 0), (0, -m, 0), (0, 0, m), (0, 0, -m)):
                q = p + np.array(d)
                if not g.contains(q):
                    ok = False
                    break
                kk, jj, ii = g.index(q)
                if lung[kk, jj, ii] != lung[k, j, i] or self.blocked[kk, jj, ii]:
                    ok = False
                    break
            if ok:
                return p
        return None

    def lung_free(self, sl: tuple[slice, slice, slice]) -> np.ndarray:
        return (self.anat.lung[sl] > 0) & ~self.blocked[sl]

    def free_lung_labels(self) -> np.ndarray:
        """Lung label volume without blocked voxels (for airway painters)."""
        return np.where(self.blocked, np.int8(0), self.anat.lung)


def cos_noise(rng: np.random.Generator, z: np.ndarray, y: np.ndarray, x: np.ndarray, wl: tuple[float, float], n: int = 3) -> np.ndarray:
    """Smooth noise (about unit variance) from ``n`` products of random cosines: cheap
    irregularity for lesion outlines, no 3D filtering."""
    out = 0.0
    for _ in range(n):
        k = 2 * np.pi / rng.uniform(*wl, size=3)
        ph = rng.uniform(0, 2 * np.pi, size=3)
        out = out + np.cos(k[0] * x + ph[0]) * np.cos(k[1] * y + ph[1]) * np.cos(k[2] * z + ph[2])
    return np.asarray(out, dtype=np.float32) * np.float32(np.sqrt(8.0 / n))


def lung_box(c: PaintContext) -> tuple[slice, slice, slice]:
    """Voxel box holding both lungs (apex to the posterior recesses, inside the ribs)."""
    p = c.anat.p
    zb = c.grid.box(np.array([-1e9, -1e9, -p["H"] - 10.0]), np.array([1e9, 1e9, 10.0]))
    return (zb[0] if zb is not None else slice(None), p["cb"][1], p["cb"][2])


def blob_region(c: PaintContext, pc: np.ndarray, semi: np.ndarray, irregular: float) -> tuple[Any, np.ndarray] | None:
    """An irregular, randomly turned ellipsoid at ``pc`` restricted to free lung: (box, mask),
    or None off the grid. ``irregular`` scales how far the outline wobbles."""
    res = ellipsoid(c.grid, pc, semi, random_rot(c.rng))
    if res is None:
        return None
    sl, lvl = res
    z, y, x = c.grid.axes(sl)
    nz = cos_noise(c.rng, z, y, x, (12.0, 30.0))
    m = (lvl * (1.0 + irregular * nz) < 1.0) & c.lung_free(sl)
    return sl, m


def random_rot(rng: np.random.Generator) -> np.ndarray:
    """A random rotation matrix (QR of a Gaussian matrix), float32."""
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q.astype(np.float32)


def paint_tube(c: PaintContext, points: list[np.ndarray], r: float, val: float, marked: np.ndarray | None = None) -> None:
    """A wire or catheter along a polyline; thinner than a voxel still shows (partial volume)."""
    g = c.grid
    for a, b in zip(points[:-1], points[1:]):
        cap = capsule(g, a, b, r, r)
        if cap is None:
            continue
        sl, dist, rad = cap
        m = dist < rad + 0.25 * min(g.spacing)
        paint(c.hu, sl, m, val)
        if marked is not None:
            marked[sl] |= m


def streaks(c: PaintContext, centre: np.ndarray, amp: float) -> None:
    """Metal streak artefact in the slices through a device: alternating bright/dark rays."""
    g = c.grid
    sl = g.box(centre - np.array([1e4, 1e4, 10.0]), centre + np.array([1e4, 1e4, 10.0]))
    if sl is None:
        return
    z, y, x = g.axes(sl)
    dx, dy = x - centre[0], y - centre[1]
    theta = np.arctan2(dy, dx)
    r = np.sqrt(dx * dx + dy * dy) + 5.0
    ph = c.rng.uniform(0, 2 * np.pi)
    s = (np.cos(9.0 * theta + ph) + 0.6 * np.cos(23.0 * theta + 2 * ph)) * np.exp(-r / 90.0) * np.float32(amp)
    body = c.hu[sl] > -900
    sub = c.hu[sl]
    np.copyto(sub, sub + np.broadcast_to(s, sub.shape).astype(np.float32), where=body)
