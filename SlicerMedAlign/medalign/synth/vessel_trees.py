"""Lung vessel trees and the bronchi beside them.

Arteries grow from the hila and veins towards the left atrium as space-filling branching
trees over random lung points; they are rasterised by splatting centre-line points and
blurring them, which gives the partial-volume look of small vessels for a fraction of
the cost of exact tubes. Bronchi follow the arteries; airway findings redraw sub-trees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medalign.synth.shapes import Grid, Slices, blur3, capsule, paint


def sample_lung_points(rng: np.random.Generator, grid: Grid, lung: np.ndarray, side: int, cb: Slices, n: int) -> np.ndarray:
    """Up to ``n`` uniform random points of one lung (rejection sampling in the rib-cage box)."""
    out = []
    got = 0
    for _ in range(6):
        m = 8 * n
        k = rng.integers(0, grid.shape[0], size=m)
        j = rng.integers(cb[1].start, cb[1].stop, size=m)
        i = rng.integers(cb[2].start, cb[2].stop, size=m)
        ok = lung[k, j, i] == side
        if ok.any():
            pts = np.stack([grid.x[i[ok]], grid.y[j[ok]], grid.z[k[ok]]], axis=1).astype(np.float64)
            out.append(pts)
            got += len(pts)
        if got >= n:
            break
    if not out:
        return np.zeros((0, 3))
    pts = np.concatenate(out)[:n]
    return pts + rng.uniform(-0.5, 0.5, pts.shape) * np.array(grid.spacing)


@dataclass
class Branch:
    """One tapered segment of a vessel or airway tree (LPS mm), with its generation."""

    p0: np.ndarray
    p1: np.ndarray
    r0: float
    r1: float
    gen: int
    path: int  # binary path id from the root: lets findings select a sub-tree


def grow_tree(rng: np.random.Generator, root: np.ndarray, pts: np.ndarray, r0: float, depth: int) -> list[Branch]:
    """Space-filling branching tree: each branch heads for the centroid of its share of
    lung points, which are split in two across their longest direction (Murray-like
    taper, r_child ~ 0.79 r). Leaves sprout short twigs so the periphery is not bare."""
    out: list[Branch] = []
    stack = [(np.asarray(root, dtype=np.float64), pts, r0, 0, 1)]
    leaves = []
    while stack:
        start, P, r, gen, path = stack.pop()
        cen = P.mean(axis=0)
        if gen >= depth or len(P) < 4:
            Q = P - start
            far = P[int(np.argmax(np.einsum("ij,ij->i", Q, Q)))]
            end = cen + 0.6 * (far - cen)
            out.append(Branch(start, end, r, max(r * 0.65, 0.6), gen, path))
            leaves.append((start, end, r, gen, path))
            continue
        frac = 0.55 if gen == 0 else float(rng.uniform(0.35, 0.6))
        end = start + (cen - start) * frac
        out.append(Branch(start, end, r, r * 0.86, gen, path))
        Q = P - cen
        axis = Q[int(np.argmax(np.einsum("ij,ij->i", Q, Q)))]
        proj = Q @ axis
        left = proj < float(rng.normal(0, 0.15)) * float(np.abs(proj).mean())
        if left.all() or not left.any():
            left = proj < np.median(proj)
        rc = r * 0.79
        for sub, bit in ((P[left], 0), (P[~left], 1)):
            if len(sub) >= 1:
                stack.append((end, sub, rc * float(rng.uniform(0.9, 1.08)), gen + 1, path * 2 + bit))
    # twigs: 2 short side branches from the middle of each leaf branch (vectorised)
    if leaves:
        S = np.array([l[0] for l in leaves])
        E = np.array([l[1] for l in leaves])
        R = np.array([l[2] for l in leaves])
        for _ in range(2):
            t = rng.uniform(0.3, 0.9, size=(len(S), 1))
            base = S + t * (E - S)
            d = (E - S)
            d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-9
            jit = rng.normal(size=d.shape)
            jit -= (jit * d).sum(1, keepdims=True) * d
            jit /= np.linalg.norm(jit, axis=1, keepdims=True) + 1e-9
            tip = base + (0.6 * d + jit) * rng.uniform(8.0, 18.0, size=(len(S), 1))
            for a in range(len(S)):
                out.append(Branch(base[a], tip[a], max(R[a] * 0.5, 0.6), 0.5, leaves[a][3] + 1, leaves[a][4] * 2))
    return out


def splat_vessels(rng: np.random.Generator, grid: Grid, out: np.ndarray, trees: list[list[Branch]]) -> Slices | None:
    """Rasterise vessel trees as partial-volume tubes: splat centre-line points weighted
    by their cross-section, then blur per radius class (sigma ~ 0.55 r). Returns the box."""
    if not trees:
        return None
    step = 0.5 * min(grid.spacing)
    branches = [b for tree in trees for b in tree]
    P0 = np.array([b.p0 for b in branches])
    P1 = np.array([b.p1 for b in branches])
    R0 = np.array([b.r0 for b in branches])
    R1 = np.array([b.r1 for b in branches])
    L = np.linalg.norm(P1 - P0, axis=1)
    n = np.maximum(np.ceil(L / step).astype(np.int64), 1)
    seg = np.repeat(np.arange(len(branches)), n)
    start = np.cumsum(n) - n
    t = (np.arange(seg.size) - start[seg] + 0.5) / n[seg]
    P = P0[seg] + t[:, None] * (P1 - P0)[seg]
    R = R0[seg] + t * (R1 - R0)[seg]
    seglen = (L / n)[seg]
    sx, sy, sz = grid.spacing
    idx = np.round((P - np.array(grid.origin)) / np.array(grid.spacing)).astype(np.int64)
    nz, ny, nx = grid.shape
    ok = (idx[:, 0] >= 0) & (idx[:, 0] < nx) & (idx[:, 1] >= 0) & (idx[:, 1] < ny) & (idx[:, 2] >= 0) & (idx[:, 2] < nz)
    idx, R, seglen = idx[ok], R[ok], seglen[ok]
    if len(R) == 0:
        return None
    lo = np.maximum(idx.min(0) - 6, 0)
    hi = np.minimum(idx.max(0) + 7, [nx, ny, nz])
    bshape = (int(hi[2] - lo[2]), int(hi[1] - lo[1]), int(hi[0] - lo[0]))
    flat = ((idx[:, 2] - lo[2]) * bshape[1] + (idx[:, 1] - lo[1])) * bshape[2] + (idx[:, 0] - lo[0])
    # thin vessels: splat the cross-section and blur once (partial volume); thick
    # vessels (few, near the hilum): exact soft-edged capsules in their own small boxes
    thin = R < 2.2
    w = np.pi * R[thin] * R[thin] * seglen[thin] / (sx * sy * sz)
    acc = np.bincount(flat[thin], weights=w, minlength=int(np.prod(bshape))).astype(np.float32).reshape(bshape)
    sig = 0.55 * 1.5
    blur3(acc, (sig / sz, sig / sy, sig / sx))
    np.clip(acc, 0.0, 1.0, out=acc)
    box = (slice(int(lo[2]), int(hi[2])), slice(int(lo[1]), int(hi[1])), slice(int(lo[0]), int(hi[0])))
    out[box] = acc
    h = float(np.mean(grid.spacing[:2]))
    for b in branches:
        if max(b.r0, b.r1) < 2.2:
            continue
        cap = capsule(grid, b.p0, b.p1, b.r0, b.r1)
        if cap is None:
            continue
        sl, dist, rad = cap
        occ = (rad - dist) / np.float32(h) + np.float32(0.5)
        np.clip(occ, 0.0, 1.0, out=occ)
        np.maximum(out[sl], occ, out=out[sl])
    return box


def bronchi_along(art: list[Branch], max_gen: int, lumen_factor: float = 0.85, start: np.ndarray | None = None) -> list[Branch]:
    """Bronchi accompany the arteries: the same branches shifted sideways by both radii,
    lumens ``lumen_factor`` times the artery (wider for bronchiectasis).  ``start`` joins
    the first generation to a main bronchus."""
    out = []
    for b in art:
        if b.gen > max_gen:
            continue
        n = np.cross(b.p1 - b.p0, np.array([0.0, 0.0, 1.0]))
        norm = np.linalg.norm(n)
        n = n / norm if norm > 1e-6 else np.array([1.0, 0.0, 0.0])
        rb0, rb1 = max(b.r0 * lumen_factor, 1.0), max(b.r1 * lumen_factor, 0.8)
        p0 = b.p0 + n * (b.r0 + rb0 + 1.0)
        if b.gen == 0 and start is not None:
            p0 = np.asarray(start, dtype=np.float64)
        out.append(Branch(p0, b.p1 + n * (b.r1 + rb1 + 1.0), rb0, rb1, b.gen, b.path))
    return out


def draw_bronchi(grid: Grid, hu: np.ndarray, bronchi: list[Branch], lung: np.ndarray, wall_mm: float,
                 lumen_scale: float, mask: np.ndarray | None = None, wall_hu: float = 40.0) -> None:
    """Paint airway walls then air lumens (two passes so a wall never covers a lumen).

    With ``mask`` (bool, full grid) the painted wall+lumen voxels are also recorded.
    """
    caps = []
    for b in bronchi:
        cap = capsule(grid, b.p0, b.p1, b.r0 * lumen_scale, b.r1 * lumen_scale, pad=wall_mm + 1.0)
        if cap is not None:
            caps.append(cap)
    for sl, dist, rad in caps:
        m = (dist < rad + wall_mm) & (lung[sl] > 0)
        # thin walls are partial-volumed at coarse voxels: blend rather than overwrite
        paint(hu, sl, m, wall_hu)
        if mask is not None:
            mask[sl] |= m
    for sl, dist, rad in caps:
        m = (dist < rad) & (lung[sl] > 0)
        paint(hu, sl, m, -950.0)
