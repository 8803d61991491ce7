"""Synthetic chest-CT phantoms with ground-truth finding masks, labels and reports.

They are the training and evaluation data of the embedded demo model, which must learn
to recognise *and localise* CT-RATE findings from images plus report text, so every
phantom carries: an int16 HU volume in RAS (``Volume``), an int32 bitmask whose bit
``f`` marks finding ``CT_RATE_FINDINGS[f]``, 0/1 labels that agree exactly with the
mask, and a free-text report whose locations and sizes come from the actual lesions.

Generation is deterministic per seed (bit-identical arrays) and vectorised so a
phantom at default settings takes a fraction of a second on one CPU core: the normal
anatomy is drawn by ``medalign.synth.anatomy``; findings are painted here.
"""

from __future__ import annotations

import csv
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medalign.core.atomic import atomic_output
from medalign.core.atomic import write_text as _write_text
from medalign.core.errors import InputError, MedAlignError
from medalign.core.parallel import ordered_map
from medalign.core.volume import Volume
from medalign.knowledge.findings import CT_RATE_FINDINGS, load_knowledge
from medalign.synth.anatomy import (
    HU_AIR,
    HU_FAT,
    Anatomy,
    Branch,
    anterior_skin_v,
    blur3,
    bronchi_along,
    build_anatomy,
    cage_profile,
    capsule,
    cavity_level,
    draw_bronchi,
    ellipsoid,
    heart_level,
    paint,
    sample_geometry,
)

GENERATOR_VERSION = "1.3"  # 1.1: dense bone, contrast inflow, ECG leads, emphysema by lung fraction; 1.2: nodes in fat;
# 1.3: one random stream per painter and one for the scanner stage (counterfactual twins)

#: Every CT-RATE finding can be inserted (all 18, in CT-RATE order).
PHANTOM_FINDINGS: list[str] = list(CT_RATE_FINDINGS)

BIT = {name: 1 << i for i, name in enumerate(CT_RATE_FINDINGS)}


@dataclass
class Phantom:
    """One synthetic CT with its ground truth (see module docstring)."""

    volume: Volume
    mask: np.ndarray
    labels: dict[str, int]
    report: str
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# painting context
# --------------------------------------------------------------------------------------


class _Ctx:
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


# --------------------------------------------------------------------------------------
# findings: each paints itself, marks its mask bit and returns report facts
# --------------------------------------------------------------------------------------


def _pleural_effusion(c: _Ctx) -> dict[str, Any]:
    """Dependent fluid: a crescent hugging the posterior chest wall, filling up to a
    nearly horizontal level (supine patient) when large, tapering upwards."""
    rng, anat, g = c.rng, c.anat, c.grid
    p = anat.p
    sides = [[1], [2], [1, 2]][int(rng.choice(3, p=[0.35, 0.25, 0.4]))]
    sl = _lung_box(c)
    Z = g.z[sl[0]][:, None, None]
    V = p["V"][sl[1], sl[2]][None]
    rho = np.sqrt(cavity_level(p, g, sl))
    v_post = p["vc"] + p["b_c"]
    post = np.clip((V - p["vc"]) / p["b_c"] + 0.2, 0.0, 1.0) ** 1.5  # none anteriorly, thickest at the back
    lung = anat.lung[sl]
    out = {"sides": [], "depth_mm": []}
    for side in sides:
        depth = float(rng.uniform(12.0, 55.0))
        z_lim = -p["H"] * float(rng.uniform(0.35, 0.6))
        for _ in range(4):
            taper = np.clip((z_lim - Z) / 45.0, 0.0, 1.0)
            shell = rho > 1.0 - (depth / p["b_c"]) * taper * post  # crescent along the wall
            level = V > v_post - 0.75 * depth * taper  # fluid level of a larger effusion
            fluid = (lung == side) & (shell | level)
            if fluid.any():
                break
            depth *= 1.5
            z_lim += 20.0
        hu = np.float32(rng.uniform(5.0, 18.0))
        sub = c.hu[sl]
        np.copyto(sub, hu, where=fluid)
        c.mark("Pleural effusion", sl, fluid, block=True)
        out["sides"].append("right" if side == 1 else "left")
        out["depth_mm"].append(round(depth, 1))
    return out


def _atelectasis(c: _Ctx) -> dict[str, Any]:
    rng, anat, g = c.rng, c.anat, c.grid
    kind = "plate" if rng.random() < 0.45 else "dependent"
    if kind == "dependent":
        side = int(rng.integers(1, 3))
        p = anat.p
        Z = g.z[:, None, None]
        V = p["V"][None]
        thick = float(rng.uniform(8.0, 22.0))
        lung_side = anat.lung == side
        # just anterior to any effusion (passive atelectasis), otherwise the posterior base
        free = lung_side & ~c.blocked
        vv = np.where(free, V, -1e9)
        vmax = vv.max(axis=1, keepdims=True)  # deepest free lung in each (z, x) column
        z_lim = -p["H"] * float(rng.uniform(0.6, 0.75))
        region = free & (V > vmax - thick) & (Z < z_lim)
        if not region.any():
            region = free & (V > vmax - thick)
        hu = np.float32(rng.uniform(15.0, 45.0))
        np.copyto(c.hu, hu, where=region)
        c.mask[region] |= BIT["Atelectasis"]
        c.blocked |= region
        idx = np.argwhere(region)
        cen = idx.mean(axis=0) if idx.size else np.array(g.shape) / 2
        pc = np.array([g.x[int(cen[2])], g.y[int(cen[1])], g.z[int(cen[0])]])
        return {"kind": kind, "center_ras": c.ras(pc), "thickness_mm": round(thick, 1), "lobe": anat.lobe(pc)}
    pc = c.lung_point(zone="lower", margin=15.0)
    if pc is None:
        pc = c.lung_point()
    n = rng.normal(size=3)
    n[2] = abs(n[2]) * 3.0  # plates lie roughly horizontal
    n /= np.linalg.norm(n)
    length = float(rng.uniform(25.0, 50.0))
    thick = float(rng.uniform(3.0, 7.0))
    res = ellipsoid(g, pc, np.array([length, length, length]))
    if res is not None:
        sl, lvl = res
        z, y, x = g.axes(sl)
        d = (x - pc[0]) * n[0] + (y - pc[1]) * n[1] + (z - pc[2]) * n[2]
        m = (lvl < 1.0) & (np.abs(d) < thick / 2 + 0.35 * g.spacing[2] * abs(n[2])) & c.lung_free(sl)
        paint(c.hu, sl, m, float(rng.uniform(-80.0, 30.0)))
        c.mark("Atelectasis", sl, m, block=True)
    c.force("Atelectasis", pc, 0.0)
    return {"kind": kind, "center_ras": c.ras(pc), "length_mm": round(2 * length, 1), "thickness_mm": round(thick, 1),
            "lobe": anat.lobe(pc)}


def _cos_noise(rng: np.random.Generator, z: np.ndarray, y: np.ndarray, x: np.ndarray, wl: tuple[float, float], n: int = 3) -> np.ndarray:
    out = 0.0
    for _ in range(n):
        k = 2 * np.pi / rng.uniform(*wl, size=3)
        ph = rng.uniform(0, 2 * np.pi, size=3)
        out = out + np.cos(k[0] * x + ph[0]) * np.cos(k[1] * y + ph[1]) * np.cos(k[2] * z + ph[2])
    return np.asarray(out, dtype=np.float32) * np.float32(np.sqrt(8.0 / n))


def _lung_box(c: _Ctx) -> tuple[slice, slice, slice]:
    """Voxel box holding both lungs (apex to the posterior recesses, inside the ribs)."""
    p = c.anat.p
    zb = c.grid.box(np.array([-1e9, -1e9, -p["H"] - 10.0]), np.array([1e9, 1e9, 10.0]))
    return (zb[0] if zb is not None else slice(None), p["cb"][1], p["cb"][2])


def _field2d(rng: np.random.Generator, c: _Ctx, sl: tuple[slice, slice, slice], wl: tuple[float, float]) -> np.ndarray:
    """Smooth random 3D field on a box, built separably (2D smooth field x 1D cosine in z
    plus a second such pair) so patchy patterns cost a few passes, not a 3D filter."""
    from medalign.synth.anatomy import _smooth2d

    g = c.grid
    shape2 = (sl[1].stop - sl[1].start, sl[2].stop - sl[2].start)
    z = g.z[sl[0]]
    out = None
    for _ in range(2):
        f2 = _smooth2d(rng, shape2, (g.spacing[1], g.spacing[0]), float(rng.uniform(*wl)) / 3.0, 1.0)
        fz = np.cos(2 * np.pi * z / rng.uniform(wl[0] * 1.5, wl[1] * 2.0) + rng.uniform(0, 6.3)).astype(np.float32)
        term = f2[None] * (np.float32(0.6) + np.float32(0.4) * fz[:, None, None])
        out = term if out is None else out + term
    return out * np.float32(1.0 / np.sqrt(2.0))


def _mosaic(c: _Ctx) -> dict[str, Any]:
    rng, anat, g = c.rng, c.anat, c.grid
    zone = str(rng.choice(["bilateral", "lower", "right", "left"]))
    sl = _lung_box(c)
    lung = anat.lung[sl]
    region = (lung > 0) & ~c.blocked[sl]
    if zone == "lower":
        region &= (g.z[sl[0]] < -0.45 * anat.p["H"])[:, None, None]
    elif zone in ("right", "left"):
        region &= lung == (1 if zone == "right" else 2)
    f = _field2d(rng, c, sl, (25.0, 55.0))
    dark = float(rng.uniform(70.0, 120.0))
    bright = float(rng.uniform(50.0, 90.0))
    dark_m = region & (f > 0.35)
    bright_m = region & (f < -0.6)
    sub = c.hu[sl]
    np.copyto(sub, np.maximum(sub - np.float32(dark), np.float32(-1000.0)), where=dark_m)
    np.copyto(sub, sub + np.float32(bright), where=bright_m)
    affected = dark_m | bright_m
    if not affected.any():
        pc = c.lung_point()
        c.force("Mosaic attenuation pattern", pc)
    c.mark("Mosaic attenuation pattern", sl, affected)
    return {"zone": zone}


def _emphysema(c: _Ctx) -> dict[str, Any]:
    """Low-attenuation areas (-990..-960 HU) until they cover 6-20% of the lung: the
    quantitative definition of emphysema (LAA-950 >= 5% of lung, as COPDGene uses).
    A fixed few dozen small holes (generator 1.0) covered about 1% of the lung; the
    LAA-950 index itself then separated positive from negative phantoms at AUC 0.63."""
    rng, anat, g = c.rng, c.anat, c.grid
    kind = str(rng.choice(["centrilobular", "paraseptal", "panlobular"], p=[0.5, 0.3, 0.2]))
    zone = "upper" if kind != "panlobular" else "lower"
    lung_voxels = float(np.count_nonzero(anat.lung))
    target = float(rng.uniform(0.06, 0.20)) * lung_voxels
    lobes: dict[str, int] = {}
    painted, covered, misses = 0, 0, 0
    while covered < target and painted < 4000 and misses < 50:
        pc = c.lung_point(zone=zone, margin=0.0 if kind == "paraseptal" else 6.0, tries=40)
        if pc is None:
            misses += 1
            continue
        r = float(rng.uniform(3.0, 8.0)) if kind != "panlobular" else float(rng.uniform(10.0, 20.0))
        res = ellipsoid(g, pc, np.array([r, r, r * 1.2]))
        if res is None:
            misses += 1
            continue
        sl, lvl = res
        m = (lvl < 1.0) & c.lung_free(sl)
        paint(c.hu, sl, m, float(rng.uniform(-990.0, -960.0)))
        c.mark("Emphysema", sl, m, block=True)
        if painted == 0:
            c.force("Emphysema", pc, -980.0)
        covered += int(np.count_nonzero(m))
        painted += 1
        lb = anat.lobe(pc)
        lobes[lb] = lobes.get(lb, 0) + 1
    if painted == 0:
        pc = c.lung_point()
        c.force("Emphysema", pc, -980.0)
        lobes[anat.lobe(pc)] = 1
    top = sorted(lobes, key=lambda k: -lobes[k])[:2]
    laa = covered / max(lung_voxels, 1.0)
    return {"kind": kind, "lobes": top, "n_areas": painted, "lung_fraction": round(laa, 3)}


def _septal(c: _Ctx) -> dict[str, Any]:
    """Thickened septa outline secondary lobules (1-2.5 cm polygons), subpleural first.

    The network is built from 2D Voronoi tessellations (cheap) stacked along z, so its
    cost is 2D work plus one 3D gather instead of a 3D distance computation.
    """
    rng, anat, g = c.rng, c.anat, c.grid
    p = anat.p
    zone = str(rng.choice(["basal", "bilateral", "right", "left"]))
    sl = _lung_box(c)
    lung = anat.lung[sl]
    region = (lung > 0) & ~c.blocked[sl]
    z = g.z[sl[0]]
    if zone == "basal":
        region &= (z < -0.5 * p["H"])[:, None, None]
    elif zone in ("right", "left"):
        region &= lung == (1 if zone == "right" else 2)
    region &= cavity_level(p, g, sl) > np.float32(0.55)  # subpleural rim
    wl = float(rng.uniform(12.0, 22.0))
    width = np.float32(0.6 * max(g.spacing[0], 1.0))
    X2 = g.x[sl[2]][None, :]
    Y2 = g.y[sl[1]][:, None]
    # secondary lobules = Voronoi cells of jittered seeds; a new 2D tessellation every
    # lobule height along z, and a horizontal septum between tessellations
    n_layers = 3
    layers = [_voronoi_edges(rng, X2, Y2, wl, width) for _ in range(n_layers)]
    tz = z / (wl * 1.1) + rng.uniform(0, 1)
    layer_of = (np.floor(tz).astype(np.int64) % n_layers)
    occz = np.clip(1.0 - (np.abs(tz - np.round(tz)) * wl * 1.1) / max(width, 0.5 * g.spacing[2]), 0.0, 1.0).astype(np.float32)
    occ = np.stack(layers)[layer_of]
    np.maximum(occ, occz[:, None, None], out=occ)
    m = region & (occ > 0.25)
    val = np.float32(rng.uniform(-350.0, -150.0))
    sub = c.hu[sl]
    np.copyto(sub, sub + occ * (val - sub), where=m)
    c.mark("Interlobular septal thickening", sl, m)
    if not m.any():
        pc = c.lung_point()
        c.force("Interlobular septal thickening", pc, float(val))
    return {"zone": zone, "lobule_mm": round(wl, 1)}


def _voronoi_edges(rng: np.random.Generator, X2: np.ndarray, Y2: np.ndarray, cell: float, width: float) -> np.ndarray:
    """Soft 2D Voronoi edges (1 on an edge, 0 inside cells) of seeds jittered on a grid."""
    x0, y0 = float(X2.min()) - cell, float(Y2.min()) - cell
    nxc = int((float(X2.max()) - x0) / cell) + 3
    nyc = int((float(Y2.max()) - y0) / cell) + 3
    seeds_x = x0 + (np.arange(nxc)[None, :] + rng.uniform(0.1, 0.9, (nyc, nxc))) * cell
    seeds_y = y0 + (np.arange(nyc)[:, None] + rng.uniform(0.1, 0.9, (nyc, nxc))) * cell
    ci = ((X2 - x0) / cell).astype(np.int64)
    cj = ((Y2 - y0) / cell).astype(np.int64)
    d1 = np.full(np.broadcast_shapes(X2.shape, Y2.shape), np.inf, dtype=np.float32)
    d2 = d1.copy()
    for dj in (-1, 0, 1):
        for di in (-1, 0, 1):
            jj = np.clip(cj + dj, 0, nyc - 1)
            ii = np.clip(ci + di, 0, nxc - 1)
            d = np.hypot(X2 - seeds_x[jj, ii], Y2 - seeds_y[jj, ii]).astype(np.float32)
            closer = d < d1
            d2 = np.where(closer, d1, np.minimum(d2, d))
            d1 = np.where(closer, d, d1)
    # (d2 - d1) / 2 approximates the distance to the cell edge
    return np.clip(1.0 - (d2 - d1) * 0.5 / width, 0.0, 1.0).astype(np.float32)


def _blob_region(c: _Ctx, pc: np.ndarray, semi: np.ndarray, irregular: float) -> tuple[Any, np.ndarray] | None:
    res = ellipsoid(c.grid, pc, semi, _random_rot(c.rng))
    if res is None:
        return None
    sl, lvl = res
    z, y, x = c.grid.axes(sl)
    nz = _cos_noise(c.rng, z, y, x, (12.0, 30.0))
    m = (lvl * (1.0 + irregular * nz) < 1.0) & c.lung_free(sl)
    return sl, m


def _random_rot(rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q.astype(np.float32)


def _lung_opacity(c: _Ctx) -> dict[str, Any]:
    rng, anat = c.rng, c.anat
    n = int(rng.integers(1, 4))
    lobes, sizes = [], []
    val = float(rng.uniform(-560.0, -330.0))
    for _ in range(n):
        pc = c.lung_point(margin=12.0)
        if pc is None:
            continue
        semi = rng.uniform(14.0, 40.0, size=3)
        res = _blob_region(c, pc, semi, 0.35)
        if res is None:
            continue
        sl, m = res
        tex = rng.normal(0.0, 25.0, size=m.shape).astype(np.float32)
        sub = c.hu[sl]
        np.copyto(sub, np.maximum(sub, np.float32(val) + tex), where=m)  # vessels stay visible
        c.mark("Lung opacity", sl, m, block=True)
        c.force("Lung opacity", pc, val)
        lobes.append(anat.lobe(pc))
        sizes.append(round(float(2 * semi.max()), 1))
    if not lobes:
        pc = c.lung_point()
        c.force("Lung opacity", pc, val)
        lobes.append(anat.lobe(pc))
        sizes.append(0.0)
    return {"lobes": lobes, "size_mm": sizes, "hu": round(val)}


def _consolidation(c: _Ctx) -> dict[str, Any]:
    rng, anat, g = c.rng, c.anat, c.grid
    pc = c.lung_point(margin=15.0, zone=str(rng.choice(["lower", "upper"])))
    if pc is None:
        pc = c.lung_point()
    lobe = anat.lobe(pc)
    semi = rng.uniform(18.0, 45.0, size=3)
    res = _blob_region(c, pc, semi, 0.25)
    val = float(rng.uniform(15.0, 45.0))
    if res is not None:
        sl, m = res
        # keep it within its lobe (fissures bound lobar consolidation)
        z, y, x = g.axes(sl)
        lobe_m = _lobe_mask(anat, sl) == _LOBES.index(lobe)
        m &= lobe_m
        air = anat.vessel[sl] > 0.3  # branching air bronchograms along the bronchovascular tree
        sub = c.hu[sl]
        vals = np.where(air, np.float32(-850.0), np.float32(val)) + rng.normal(0, 8.0, size=m.shape).astype(np.float32)
        np.copyto(sub, vals, where=m)
        c.mark("Consolidation", sl, m, block=True)
    c.force("Consolidation", pc, val)
    return {"lobe": lobe, "size_mm": round(float(2 * semi.max()), 1), "center_ras": c.ras(pc), "air_bronchogram": True}


_LOBES = ["right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "lingula", "left lower lobe"]


def _lobe_mask(anat: Anatomy, sl: tuple[slice, slice, slice]) -> np.ndarray:
    """Vectorised ``Anatomy.lobe`` over a box: index into ``_LOBES``."""
    p = anat.p
    z = anat.grid.z[sl[0]][:, None, None]
    U = p["U"][sl[1], sl[2]][None]
    V = p["V"][sl[1], sl[2]][None]
    H = p["H"]
    vn = np.clip((V - p["vc"]) / p["b_c"], -1.0, 1.0)
    z_obl = -H * (0.36 + 0.44 * (1.0 - vn) / 2.0)
    lower = z < z_obl
    right = U < p["u_med"]
    out = np.where(right, np.where(lower, 2, np.where(z > -0.5 * H, 0, 1)),
                   np.where(lower, 5, np.where((z < -0.56 * H) & (vn < 0), 4, 3)))
    return out.astype(np.int8)


def _fibrosis(c: _Ctx) -> dict[str, Any]:
    rng, anat, g = c.rng, c.anat, c.grid
    pc0 = c.lung_point(zone=str(rng.choice(["upper", "lower"], p=[0.6, 0.4])), margin=10.0)
    if pc0 is None:
        pc0 = c.lung_point()
    n = int(rng.integers(2, 6))
    for _ in range(n):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        L = float(rng.uniform(12.0, 35.0))
        a = pc0 + rng.normal(0, 8.0, size=3)
        cap = capsule(g, a, a + d * L, float(rng.uniform(1.0, 2.2)), float(rng.uniform(0.8, 1.5)))
        if cap is None:
            continue
        sl, dist, rad = cap
        m = (dist < rad) & c.lung_free(sl)
        paint(c.hu, sl, m, float(rng.uniform(-60.0, 40.0)))
        c.mark("Pulmonary fibrotic sequela", sl, m, block=True)
    # small volume-loss reticulation around the scar
    res = ellipsoid(g, pc0, np.array([14.0, 14.0, 14.0]))
    if res is not None and rng.random() < 0.6:
        sl, lvl = res
        z, y, x = g.axes(sl)
        nz = _cos_noise(rng, z, y, x, (6.0, 12.0))
        m = (lvl < 1.0) & (nz > 1.0) & c.lung_free(sl)
        paint(c.hu, sl, m, -300.0)
        c.mark("Pulmonary fibrotic sequela", sl, m, block=True)
    c.force("Pulmonary fibrotic sequela", pc0, 0.0)
    return {"lobe": anat.lobe(pc0), "center_ras": c.ras(pc0), "n_bands": n}


def _subtree(c: _Ctx, gen_root: int) -> tuple[list[Branch], int]:
    """Branches of one arterial sub-tree (a bronchopulmonary segment) and its lung side."""
    trees = c.anat.p["trees"]
    side, art, _veins, _bro = trees[int(c.rng.integers(len(trees)))]
    roots = [b for b in art if b.gen == gen_root]
    if not roots:
        return [], side
    root = roots[int(c.rng.integers(len(roots)))]
    out = []
    for b in art:
        if b.gen >= gen_root:
            shift = b.gen - gen_root
            if (b.path >> shift) == root.path:
                out.append(b)
    return out, side


def _bronchiectasis(c: _Ctx) -> dict[str, Any]:
    rng, anat, g = c.rng, c.anat, c.grid
    factor = float(rng.uniform(1.4, 2.2))
    wall = float(rng.uniform(1.2, 2.2))
    kind = "cylindrical" if factor < 1.8 else "varicose"
    for gen_root in (2, 1, 0):
        branches, side = _subtree(c, gen_root)
        if branches:
            break
    aw = bronchi_along(branches, max_gen=7, lumen_factor=factor)
    m = np.zeros(g.shape, dtype=bool)
    draw_bronchi(g, c.hu, aw, c.free_lung_labels(), wall_mm=wall, lumen_scale=1.0, mask=m, wall_hu=float(rng.uniform(20, 60)))
    c.mask[m] |= BIT["Bronchiectasis"]
    c.blocked |= m
    pc = aw[0].p1 if aw else c.lung_point()
    if not m.any():
        c.force("Bronchiectasis", pc, -900.0)
    return {"lobe": anat.lobe(pc), "kind": kind, "ratio": round(factor * 0.85 + 0.5, 2)}


def _peribronchial(c: _Ctx) -> dict[str, Any]:
    rng, anat, g = c.rng, c.anat, c.grid
    wall = float(rng.uniform(2.2, 3.8))
    trees = anat.p["trees"]
    chosen = trees if rng.random() < 0.5 else [trees[int(rng.integers(len(trees)))]]
    m = np.zeros(g.shape, dtype=bool)
    where = []
    for side, art, _v, _b in chosen:
        aw = bronchi_along(art, max_gen=5)
        aw = [b for b in aw if b.gen >= 1]
        tmp = np.zeros(g.shape, dtype=bool)
        draw_bronchi(g, c.hu, aw, c.free_lung_labels(), wall_mm=wall, lumen_scale=1.0, mask=tmp, wall_hu=float(rng.uniform(20, 50)))
        m |= tmp
        where.append("right" if side == 1 else "left")
    # the mask is the thickened wall, not the air lumen
    m &= c.hu > -600
    c.mask[m] |= BIT["Peribronchial thickening"]
    c.blocked |= m
    if not m.any():
        c.force("Peribronchial thickening", c.lung_point(), 30.0)
    return {"sides": where, "wall_mm": round(wall, 1)}


def _lung_nodule(c: _Ctx) -> dict[str, Any]:
    rng, anat, g = c.rng, c.anat, c.grid
    n = int(rng.choice([1, 1, 1, 2, 3]))
    nodules = []
    for _ in range(n):
        d = float(rng.uniform(5.0, 30.0)) if not nodules else float(rng.uniform(4.0, 12.0))
        r = d / 2
        pc = c.lung_point(margin=r + 3.0)
        if pc is None:
            continue
        res = ellipsoid(g, pc, np.array([r, r, r]) * rng.uniform(0.85, 1.15, size=3), _random_rot(rng), scale=1.3)
        solid = rng.random() < 0.8
        val = float(rng.uniform(15.0, 60.0)) if solid else float(rng.uniform(-550.0, -300.0))
        if res is not None:
            sl, lvl = res
            z, y, x = g.axes(sl)
            lob = _cos_noise(rng, z - pc[2], y - pc[1], x - pc[0], (max(d, 6.0) * 0.6, max(d, 6.0) * 1.2), n=2)
            m = (lvl * (1.0 + 0.12 * lob) < 1.0) & c.lung_free(sl)
            paint(c.hu, sl, m, val)
            c.mark("Lung nodule", sl, m, block=True)
        c.force("Lung nodule", pc, val)
        nodules.append({"center_ras": c.ras(pc), "diameter_mm": round(d, 1), "lobe": anat.lobe(pc), "solid": solid})
    if not nodules:
        pc = c.lung_point()
        c.force("Lung nodule", pc, 40.0)
        nodules.append({"center_ras": c.ras(pc), "diameter_mm": 4.0, "lobe": anat.lobe(pc), "solid": True})
    return {"nodules": nodules}


def _stations(anat: Anatomy) -> dict[str, np.ndarray]:
    p = anat.p
    b = anat.to_body
    car = b(p["carina"])
    aorta = b(p["aorta_pts"])
    hr, hl = b(p["hilumR"]), b(p["hilumL"])
    return {
        "right paratracheal": np.array([car[0] - p["r_tr"] - 13.0, car[1] - 4.0, car[2] + 28.0]),
        "subcarinal": np.array([car[0] + 3.0, car[1] + 14.0, car[2] - 20.0]),
        "prevascular": np.array([aorta[3][0] + 8.0, aorta[3][1] - 28.0, aorta[3][2] - 5.0]),
        "aortopulmonary window": np.array([car[0] + 24.0, car[1] - 6.0, car[2] + 6.0]),
        "right hilar": hr + np.array([-4.0, -10.0, -6.0]),
        "left hilar": hl + np.array([4.0, -10.0, -4.0]),
    }


def _nodes(c: _Ctx, names: list[str], short_axis: tuple[float, float], finding: str | None) -> list[dict[str, Any]]:
    rng, anat = c.rng, c.anat
    st = _stations(anat)
    out = []
    for name in names:
        sa = float(rng.uniform(*short_axis))
        la = sa * float(rng.uniform(1.0, 1.5))
        semi = np.array([sa / 2, sa / 2, la / 2])
        site = _node_site(c, anat.to_world(*st[name]), semi, _random_rot(rng) if la / sa < 1.1 else None)
        if site is None:
            continue
        centre, sl, m = site
        paint(c.hu, sl, m, float(rng.uniform(30.0, 50.0)))
        c.blocked[sl] |= m
        if finding:
            c.mark(finding, sl, m)
            c.force(finding, centre)
        out.append({"station": name, "short_axis_mm": round(sa, 1), "long_axis_mm": round(la, 1), "center_ras": c.ras(centre)})
    return out


NODE_SITE_TRIES = 24
FAT_HU = (HU_FAT - 50.0, HU_FAT + 70.0)  # noise-free anatomy: mediastinal fat is HU_FAT or HU_FAT + 10


def _node_site(c: _Ctx, station: np.ndarray, semi: np.ndarray, rot: np.ndarray | None
               ) -> tuple[np.ndarray, tuple[slice, slice, slice], np.ndarray] | None:
    """Centre near ``station`` where a node lies in mediastinal fat, and the fat voxels it fills.

    Lymph nodes sit in fat and push it aside. Generator 1.1 painted them wherever the
    station fell: 40% of node voxels landed on lung (a blob that looks like a lung
    nodule, but unlabelled as one) and 26% on vessels or heart, where a 40 HU node in
    40 HU blood is invisible. The search widens until 90% of the node is fat; the node
    then covers fat only, so what is labelled is what is visible."""
    best = None
    for attempt in range(NODE_SITE_TRIES):
        centre = station + c.rng.normal(0.0, 3.0 + 0.5 * attempt, size=3)
        res = ellipsoid(c.grid, centre, semi, rot)
        if res is None:
            continue
        sl, lvl = res
        inside = lvl < 1.0
        fat = inside & (c.hu[sl] >= FAT_HU[0]) & (c.hu[sl] <= FAT_HU[1]) & ~c.blocked[sl]
        share = fat.sum() / max(int(inside.sum()), 1)
        if fat.any() and (best is None or share > best[0]):
            best = (share, centre, sl, fat)
        if share >= 0.9:
            break
    return None if best is None else best[1:]


def _lymphadenopathy(c: _Ctx) -> dict[str, Any]:
    names = list(_stations(c.anat))
    k = int(c.rng.integers(1, 4))
    chosen = [names[i] for i in sorted(c.rng.choice(len(names), size=k, replace=False))]
    return {"nodes": _nodes(c, chosen, (11.0, 28.0), "Lymphadenopathy")}


def _hiatal_hernia(c: _Ctx) -> dict[str, Any]:
    rng, anat, g = c.rng, c.anat, c.grid
    p = anat.p
    es_bot = anat.to_body(p["es_pts"][2])
    size = float(rng.uniform(28.0, 60.0))
    cen_b = np.array([es_bot[0] - 4.0, es_bot[1] + 4.0, p["zL"] + size * 0.35 + 6.0])
    centre = anat.to_world(*cen_b)
    semi = np.array([size / 2, size * 0.4, size * 0.45])
    res = ellipsoid(g, centre, semi)
    if res is not None:
        sl, lvl = res
        y = g.axes(sl)[1]
        m = lvl < 1.0
        level = centre[1] - float(rng.uniform(-0.2, 0.5)) * semi[1]
        paint(c.hu, sl, m, 45.0)
        inner = lvl < 0.7
        paint(c.hu, sl, inner, np.where(y < level, np.float32(HU_AIR), np.float32(rng.uniform(5.0, 25.0))))
        c.mark("Hiatal hernia", sl, m)
    c.force("Hiatal hernia", centre)
    return {"size_mm": round(size, 1), "center_ras": c.ras(centre)}


def _aortic_calcification(c: _Ctx) -> dict[str, Any]:
    rng, anat, g = c.rng, c.anat, c.grid
    P, R = anat.p["aorta_pts"], anat.p["aorta_r"]
    n = int(rng.integers(2, 9))
    where = set()
    for _ in range(n):
        a = int(rng.integers(2, len(P) - 1))
        t = float(rng.uniform(0, 1))
        cen = P[a] + t * (P[a + 1] - P[a])
        r = R[a] + t * (R[a + 1] - R[a])
        d = P[a + 1] - P[a]
        d /= np.linalg.norm(d)
        n_ = np.cross(d, rng.normal(size=3))
        n_ /= np.linalg.norm(n_)
        pc = cen + n_ * (r + 0.5)
        size = float(rng.uniform(1.5, 4.0))
        res = ellipsoid(g, pc, np.array([size, size, size * 1.6]) / 2 + 0.6)
        val = float(rng.uniform(350.0, 1000.0))
        if res is not None:
            sl, lvl = res
            m = lvl < 1.0
            paint(c.hu, sl, m, val)
            c.mark("Arterial wall calcification", sl, m)
        c.force("Arterial wall calcification", pc, val)
        where.add("aortic arch" if 2 <= a <= 8 else "descending aorta")
    return {"n_plaques": n, "segments": sorted(where)}


def _coronary_calcification(c: _Ctx) -> dict[str, Any]:
    rng, anat, g = c.rng, c.anat, c.grid
    p = anat.p
    hc, semi, rot = p["heart_c"], p["heart_semi"], p["heart_rot"]
    # local direction of "anterior" and "superior" for the interventricular and AV grooves
    ant_l = rot @ anat.to_world(0.0, -1.0, 0.0) - rot @ anat.to_world(0.0, 0.0, 0.0)
    phi_ant = float(np.arctan2(ant_l[2], ant_l[1]))
    vessels = {"left anterior descending": [], "right coronary": [], "circumflex": []}
    n = int(rng.integers(1, 7))
    names = list(vessels)
    for _ in range(n):
        v = names[int(rng.integers(3))]
        if v == "left anterior descending":
            xl, phi = float(rng.uniform(-0.3, 0.75)), phi_ant + float(rng.normal(0, 0.15))
        elif v == "right coronary":
            xl, phi = -0.45 + float(rng.normal(0, 0.05)), phi_ant + float(rng.uniform(0.6, 1.8))
        else:
            xl, phi = -0.45 + float(rng.normal(0, 0.05)), phi_ant - float(rng.uniform(0.6, 1.8))
        rr = np.sqrt(max(1.0 - xl * xl, 0.05)) * 1.02
        loc = np.array([xl * semi[0], rr * semi[1] * np.cos(phi), rr * semi[2] * np.sin(phi)])
        pc = hc + rot.T @ loc
        size = float(rng.uniform(1.5, 4.5))
        val = float(rng.uniform(300.0, 1000.0))
        res = ellipsoid(g, pc, np.array([size, size, size]) / 2 + 0.5)
        if res is not None:
            sl, lvl = res
            m = lvl < 1.0
            paint(c.hu, sl, m, val)
            c.mark("Coronary artery wall calcification", sl, m)
        c.force("Coronary artery wall calcification", pc, val)
        vessels[v].append(round(size, 1))
    return {"vessels": [k for k, v in vessels.items() if v], "n_plaques": n}


def _medical_material(c: _Ctx) -> dict[str, Any]:
    rng, anat, g = c.rng, c.anat, c.grid
    p = anat.p
    kind = str(rng.choice(["pacemaker", "port catheter", "nasogastric tube", "sternotomy wires"]))
    W = anat.to_world
    hc = p["heart_c"]
    marked = np.zeros(g.shape, dtype=bool)

    side = 1.0 if rng.random() < 0.75 else -1.0  # devices usually on the left
    if kind in ("pacemaker", "port catheter"):
        dev_b = np.array([side * 0.55 * p["A"], -(p["B"] * 1.04 - p["fat"] * 0.55), -0.12 * p["H"]])
        dev = W(*dev_b)
        semi = np.array([24.0, 4.5, 20.0]) if kind == "pacemaker" else np.array([12.0, 6.0, 12.0])
        val = 3000.0 if kind == "pacemaker" else float(rng.uniform(1500.0, 2500.0))
        res = ellipsoid(g, dev, semi, None)
        if res is not None:
            sl, lvl = res
            m = lvl < 1.0
            paint(c.hu, sl, m, val)
            marked[sl] |= m
        svc = p["svc"]
        vein = W(side * 45.0, -p["b_c"] * 0.6 + p["vc"], -0.06 * p["H"])
        ra = hc + np.array([-0.55 * p["heart_semi"][0], 0.0, 0.1 * p["heart_semi"][2]])
        path = [dev, vein, svc, ra]
        if kind == "pacemaker":
            path.append(hc + p["heart_rot"].T @ np.array([0.6 * p["heart_semi"][0], -0.2 * p["heart_semi"][1], -0.3 * p["heart_semi"][2]]))
            _paint_tube(c, path, 1.1, 2500.0, marked)
            _streaks(c, dev, amp=float(rng.uniform(120.0, 300.0)))
        else:
            _paint_tube(c, path[:3] + [svc + (ra - svc) * 0.5], 1.3, float(rng.uniform(150.0, 400.0)), marked)
        where = f"{'left' if side > 0 else 'right'} anterior chest wall"
    elif kind == "nasogastric tube":
        es = p["es_pts"]
        st = W(0.45 * p["a_c"], p["vc"] - 0.1 * p["b_c"], p["zL"] - 40.0)
        _paint_tube(c, [es[0], es[1], es[2], st], 2.2, float(rng.uniform(200.0, 450.0)), marked)
        where = "oesophagus towards the stomach"
    else:
        b_st = -(p["b_c"] - p["vc"]) - 3.0
        for z in np.linspace(-0.18 * p["H"], -0.62 * p["H"], int(rng.integers(4, 7))):
            pts = [W(-20.0, b_st + 2, z), W(-12.0, b_st - 9, z), W(12.0, b_st - 9, z), W(20.0, b_st + 2, z)]
            _paint_tube(c, pts, 1.0, 3000.0, marked)
        where = "sternum"
    c.mask[marked] |= BIT["Medical material"]
    if not marked.any():
        c.force("Medical material", hc, 3000.0)
    return {"kind": kind, "where": where}


def _paint_tube(c: _Ctx, points: list[np.ndarray], r: float, val: float, marked: np.ndarray | None = None) -> None:
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


def _ecg_leads(c: _Ctx) -> int:
    """ECG electrodes on the anterior skin, metal snaps and lead wires through the air in
    front.  Real scans carry them and reports do not call them medical material, so they
    are anatomy-like context, not a finding (no mask bit): without them every bright
    speck outside the body was a device to the model.  Returns the number of electrodes."""
    rng, anat, g = c.rng, c.anat, c.grid
    p = anat.p
    A, B_ant = p["A"], p["B_ant"]
    W = anat.to_world
    n = int(rng.integers(2, 6))
    for _ in range(n):
        u = float(rng.uniform(-0.75, 0.75)) * A
        v_skin = anterior_skin_v(p, u)
        z = float(rng.uniform(-0.75, -0.05)) * p["H"]
        for centre, semi, val in ((W(u, v_skin - 1.0, z), np.array([6.0, 1.2, 6.0]), float(rng.uniform(-50.0, 100.0))),
                                  (W(u, v_skin - 3.0, z), np.array([2.0, 1.5, 2.0]), float(rng.uniform(1500.0, 3000.0)))):
            res = ellipsoid(g, centre, semi)
            if res is not None:
                sl, lvl = res
                paint(c.hu, sl, lvl < 1.0, val)
        lift = -B_ant - float(rng.uniform(6.0, 25.0))  # wires run in the air in front of the chest
        away = float(np.sign(u) or 1.0) * float(rng.uniform(60.0, 150.0))
        wire = [W(u, v_skin - 3.0, z), W(u, lift, z), W(u + away, lift, z + float(rng.uniform(-30.0, 30.0)))]
        _paint_tube(c, wire, float(rng.uniform(0.4, 0.8)), float(rng.uniform(800.0, 2000.0)))
    return n


def _streaks(c: _Ctx, centre: np.ndarray, amp: float) -> None:
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


# Order matters: fluid first (it displaces lung), then focal lesions, then diffuse
# patterns, which fill the remaining free lung around them (``_Ctx.blocked``).
_PAINTERS: dict[str, Callable[[_Ctx], dict[str, Any]]] = {
    "Pleural effusion": _pleural_effusion,
    "Lung nodule": _lung_nodule,
    "Atelectasis": _atelectasis,
    "Consolidation": _consolidation,
    "Lung opacity": _lung_opacity,
    "Pulmonary fibrotic sequela": _fibrosis,
    "Bronchiectasis": _bronchiectasis,
    "Peribronchial thickening": _peribronchial,
    "Emphysema": _emphysema,
    "Mosaic attenuation pattern": _mosaic,
    "Interlobular septal thickening": _septal,
    "Lymphadenopathy": _lymphadenopathy,
    "Hiatal hernia": _hiatal_hernia,
    "Arterial wall calcification": _aortic_calcification,
    "Coronary artery wall calcification": _coronary_calcification,
    "Medical material": _medical_material,
}
# Cardiomegaly and Pericardial effusion change the anatomy itself (see build_anatomy).
_ANATOMICAL = ("Cardiomegaly", "Pericardial effusion")
assert set(_PAINTERS) | set(_ANATOMICAL) == set(PHANTOM_FINDINGS)


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------


def case_seed(seed: int, index: int) -> int:
    """Per-case seed from (dataset seed, index): any case can be regenerated alone."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]).generate_state(1, dtype=np.uint32)[0])


def _check_labels(labels: dict[str, int] | None) -> dict[str, int] | None:
    if labels is None:
        return None
    unknown = [k for k in labels if k not in CT_RATE_FINDINGS]
    if unknown:
        raise InputError(f"Unknown finding {unknown[0]!r}; phantom labels must be CT-RATE names such as 'Lung nodule'.")
    bad = [k for k, v in labels.items() if int(v) not in (0, 1)]
    if bad:
        raise InputError(f"Label of {bad[0]!r} must be 0 or 1.")
    return {k: int(v) for k, v in labels.items()}


SAMPLE_SEED = 20261123
SAMPLE_FINDINGS = ("Lung nodule", "Pleural effusion", "Cardiomegaly")


def sample_chest_ct():
    """The bundled sample CT: one fixed phantom holding ``SAMPLE_FINDINGS`` and no other
    CT-RATE finding, so ``medalign screen --sample`` and the web viewer's "Sample CT"
    show the same scan (a fresh install can try the tool without data)."""
    labels = {f: int(f in SAMPLE_FINDINGS) for f in CT_RATE_FINDINGS}
    return make_phantom(seed=SAMPLE_SEED, labels=labels)


def make_phantom(seed: int, labels: dict[str, int] | None = None, spacing: tuple[float, float, float] | None = None,
                 prevalence: float = 0.3) -> Phantom:
    """One synthetic chest CT.

    ``labels`` forces findings on (1) or off (0); findings it does not name are drawn
    independently with probability ``prevalence``. ``spacing`` (mm along i, j, k)
    overrides the random scan geometry. The result is bit-identical for a seed.
    """
    if not 0.0 <= float(prevalence) <= 1.0:
        raise InputError(f"Prevalence must lie between 0 and 1, not {prevalence}.")
    labels = _check_labels(labels)
    if spacing is not None:
        if len(spacing) != 3 or not all(0.3 <= float(s) <= 10.0 for s in spacing):
            raise InputError("Phantom spacing must be three values between 0.3 and 10 mm.")
    rng = np.random.default_rng(int(seed) & 0xFFFFFFFFFFFFFFFF)
    present = {}
    for name in CT_RATE_FINDINGS:  # one draw per finding in fixed order keeps seeds stable
        draw = rng.random() < prevalence
        present[name] = int(labels[name]) if labels is not None and name in labels else int(draw)

    geom = sample_geometry(rng, spacing)
    heart_scale = float(rng.uniform(1.22, 1.45)) if present["Cardiomegaly"] else float(rng.uniform(0.88, 1.05))
    peri_mm = float(rng.uniform(5.0, 20.0))  # drawn either way: the anatomy after it stays the same
    peri_mm = peri_mm if present["Pericardial effusion"] else 0.0
    contrast = bool(rng.random() < 0.3)
    anat = build_anatomy(rng, geom, heart_scale=heart_scale, pericardial_fluid_mm=peri_mm, contrast=contrast)
    anat.p["z_table"] = float(np.round(rng.uniform(-420.0, -80.0), 1))
    ctx = _Ctx(anat, rng)

    # Anatomical findings: the heart itself, the pericardial fluid rim.
    p = anat.p
    facts: dict[str, dict[str, Any]] = {}
    if present["Cardiomegaly"] or present["Pericardial effusion"]:
        res = heart_level(p, anat.grid, scale=1.0 + (peri_mm + 6) / float(p["heart_semi"].min()))
        if res is not None:
            sl, lvl = res
            if present["Cardiomegaly"]:
                heart = lvl < 1.0
                ctx.mark("Cardiomegaly", sl, heart)
                ctx.force("Cardiomegaly", p["heart_c"])
                # cardiothoracic ratio: widest transverse heart extent / rib-cage width there
                _, jj, ii = np.nonzero(heart)
                u = p["U"][jj + sl[1].start, ii + sl[2].start]
                cage = 2 * p["a_c"] * float(cage_profile(np.array(-p["heart_c"][2] / p["H"])))
                ctr = float(u.max() - u.min()) / cage if u.size else 0.0
                facts["Cardiomegaly"] = {"scale": round(heart_scale, 2), "ctr": round(ctr, 2)}
            if present["Pericardial effusion"]:
                fl = 1.0 + peri_mm / float(p["heart_semi"].min())
                shell = (lvl >= 1.0) & (lvl < fl * fl)
                ctx.mark("Pericardial effusion", sl, shell)
                facts["Pericardial effusion"] = {"thickness_mm": round(peri_mm, 1)}
        if present["Pericardial effusion"] and not ctx.has("Pericardial effusion"):
            ctx.force("Pericardial effusion", p["heart_c"] + p["heart_rot"][1] * p["heart_semi"][1] * 1.05)

    # Small normal lymph nodes (short axis < 10 mm) in every phantom: size, not presence, is the finding.
    normal_nodes = [n for n in _stations(anat) if rng.random() < 0.3 and not present["Lymphadenopathy"]]
    _nodes(ctx, normal_nodes, (4.0, 8.5), None)

    # One random stream per painter and one for the scanner stage, split off the seed
    # rather than drawn in sequence: turning one finding on or off (``labels``) then leaves
    # the other lesions, the ECG leads and the noise as they were (counterfactual twins).
    *painter_rngs, scanner_rng = rng.spawn(len(_PAINTERS) + 1)
    for (name, painter), painter_rng in zip(_PAINTERS.items(), painter_rngs):
        if present[name]:
            ctx.rng = painter_rng
            facts[name] = painter(ctx)

    rng = ctx.rng = scanner_rng
    if p["inflow"] is not None:  # beam hardening next to undiluted contrast
        _streaks(ctx, p["inflow"], amp=float(rng.uniform(30.0, 120.0)))
    n_ecg = _ecg_leads(ctx) if rng.random() < 0.5 else 0
    vol_hu = _finish(anat, rng)
    mask = ctx.mask
    # labels and masks agree by construction; verify (cheap) rather than trust
    bits = np.bitwise_or.reduce(mask, axis=None) if mask.size else 0
    for name in CT_RATE_FINDINGS:
        if bool(int(bits) & BIT[name]) != bool(present[name]):
            raise MedAlignError(f"Phantom {seed}: mask and label disagree for {name}.")

    sx, sy, sz = anat.grid.spacing
    x0, y0, z0 = anat.grid.origin
    ijk_to_ras = np.array([[-sx, 0, 0, -x0], [0, -sy, 0, -y0], [0, 0, sz, z0 + p["z_table"]], [0, 0, 0, 1]], dtype=np.float64)
    volume = Volume(vol_hu, ijk_to_ras, metadata={"modality": "CT", "source": "medalign phantom", "seed": int(seed)})
    report = make_report(rng, present, facts, anat)
    meta = {
        "seed": int(seed),
        "generator_version": GENERATOR_VERSION,
        "spacing": [float(sx), float(sy), float(sz)],
        "shape_kji": list(vol_hu.shape),
        "contrast": contrast,
        "contrast_inflow": p["inflow"] is not None,
        "ecg_electrodes": n_ecg,
        "noise_hu": p["noise_hu"],
        "body_half_axes_mm": [round(p["A"], 1), round(p["B"], 1)],
        "rotation_deg": round(float(np.rad2deg(p["angle"])), 2),
        "findings": _jsonable(facts),
    }
    return Phantom(volume=volume, mask=mask, labels={k: int(present[k]) for k in CT_RATE_FINDINGS}, report=report, meta=meta)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


def _finish(anat: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Scanner look: correlated quantum noise plus partial-volume blur, then int16 HU.

    Uniform noise is used because it is four times cheaper to draw than Gaussian noise
    and the blur (a sum of neighbours) makes it Gaussian-looking anyway; it is pre-scaled
    so its standard deviation after the blur is the drawn ``noise`` level.
    """
    g = anat.grid
    sz = g.spacing[2]
    noise = float(rng.uniform(8.0, 28.0))
    anat.p["noise_hu"] = round(noise, 1)
    sig = (0.55 * min(2.0 / sz, 1.0), 0.6, 0.6)  # voxels along (k, j, i): thick slices blur less between slices
    shrink = 1.0
    for s in sig:
        if s > 0.2:
            w1 = np.exp(-0.5 / (s * s))
            w = np.array([w1, 1.0, w1]) / (1.0 + 2.0 * w1)
            shrink *= float(np.sqrt((w * w).sum()))
    hu = anat.hu
    u = np.empty_like(hu)
    rng.random(out=u, dtype=np.float32)
    u -= np.float32(0.5)
    u *= np.float32(np.sqrt(12.0) * noise / shrink)
    hu += u
    blur3(hu, sig, buf=u)
    del u
    np.clip(hu, -1024.0, 3071.0, out=hu)
    np.rint(hu, out=hu)
    return hu.astype(np.int16)


# --------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, items: list[str] | tuple[str, ...]) -> str:
    return items[int(rng.integers(len(items)))]


def _sides_phrase(sides: list[str]) -> str:
    return "bilateral" if len(set(sides)) > 1 else sides[0]


def _term(rng: np.random.Generator, kb: dict, name: str, k: int = 2) -> str:
    """The finding's name or one of its first synonyms (varied wording)."""
    options = [name] + list(kb[name].synonyms[:k]) if name in kb else [name]
    return _pick(rng, options).lower()


def _positive(rng: np.random.Generator, name: str, f: dict[str, Any], kb: dict) -> str:
    t = lambda k=2: _term(rng, kb, name, k)  # noqa: E731
    if name == "Lung nodule":
        parts = []
        for n in f["nodules"]:
            kind = "solid" if n["solid"] else "ground-glass density"
            parts.append(_pick(rng, [
                f"A {n['diameter_mm']:.0f} mm {kind} nodule is observed in the {n['lobe']}.",
                f"In the {n['lobe']}, a {kind} nodular lesion measuring {n['diameter_mm']:.0f} mm was detected.",
                f"There is a {n['diameter_mm']:.0f} mm pulmonary nodule in the {n['lobe']}.",
            ]))
        return " ".join(parts)
    if name == "Pleural effusion":
        side = _sides_phrase(f["sides"])
        d = max(f["depth_mm"]) / 10.0
        return _pick(rng, [
            f"{side.capitalize()} pleural effusion is observed, measuring {d:.1f} cm in its thickest part.",
            f"There is {side} pleural effusion with a maximum thickness of {d:.1f} cm.",
            f"{side.capitalize()} pleural fluid is seen in the dependent pleural space, about {d:.1f} cm thick.",
        ])
    if name == "Atelectasis":
        if f["kind"] == "plate":
            return _pick(rng, [f"Plate-like atelectasis is observed in the {f['lobe']}.",
                               f"Linear atelectasis is seen in the {f['lobe']}.",
                               f"Subsegmental atelectatic changes are noted in the {f['lobe']}."])
        return _pick(rng, [f"Atelectasis is observed in the posterobasal part of the {f['lobe']}.",
                           f"Compressive atelectatic changes are seen in the dependent {f['lobe']}.",
                           f"There is dependent atelectasis in the {f['lobe']}."])
    if name == "Consolidation":
        return _pick(rng, [
            f"An area of consolidation containing air bronchograms is observed in the {f['lobe']}, "
            f"measuring about {f['size_mm'] / 10:.1f} cm.",
            f"Consolidation with air bronchograms is seen in the {f['lobe']}.",
            f"There is {t()} in the {f['lobe']} with air bronchograms.",
        ])
    if name == "Lung opacity":
        where = " and ".join(sorted(set(f["lobes"])))
        return _pick(rng, [
            f"Ground glass opacities are observed in the {where}.",
            f"Patchy ground-glass density areas are seen in the {where}.",
            f"There are areas of increased density (lung opacity) in the {where}.",
        ])
    if name == "Emphysema":
        where = " and ".join(f["lobes"]) if f["lobes"] else "both lungs"
        return _pick(rng, [
            f"{f['kind'].capitalize()} emphysematous changes are observed, most prominent in the {where}.",
            f"{f['kind'].capitalize()} emphysema is seen in the {where}.",
            f"There are {f['kind']} emphysematous areas in the {where}.",
        ])
    if name == "Mosaic attenuation pattern":
        zone = {"bilateral": "both lungs", "lower": "both lower lobes", "right": "the right lung", "left": "the left lung"}[f["zone"]]
        return _pick(rng, [f"A mosaic attenuation pattern is observed in {zone}.",
                           f"Mosaic attenuation is seen in {zone}, suggesting small airway disease or air trapping.",
                           f"There is a mosaic perfusion pattern in {zone}."])
    if name == "Interlobular septal thickening":
        zone = {"basal": "the basal segments of both lungs", "bilateral": "the subpleural areas of both lungs",
                "right": "the subpleural right lung", "left": "the subpleural left lung"}[f["zone"]]
        return _pick(rng, [f"Interlobular septal thickening is observed in {zone}.",
                           f"Thickened interlobular septa are seen in {zone}.",
                           f"There is septal thickening in {zone}."])
    if name == "Pulmonary fibrotic sequela":
        return _pick(rng, [f"Fibrotic sequelae changes are observed in the {f['lobe']}.",
                           f"Linear fibrotic bands consistent with sequelae are seen in the {f['lobe']}.",
                           f"There are fibrotic changes in the {f['lobe']}."])
    if name == "Bronchiectasis":
        return _pick(rng, [f"{f['kind'].capitalize()} bronchiectasis is observed in the {f['lobe']}.",
                           f"Bronchiectatic changes with bronchial wall thickening are seen in the {f['lobe']}.",
                           f"There is {f['kind']} bronchiectasis in the {f['lobe']}, "
                           "the bronchi being wider than the accompanying arteries."])
    if name == "Peribronchial thickening":
        side = "both lungs" if len(f["sides"]) > 1 else f"the {f['sides'][0]} lung"
        return _pick(rng, [f"Peribronchial thickening is observed in {side}.",
                           f"Bronchial wall thickening (peribronchial cuffing) is seen in {side}.",
                           f"There is peribronchial wall thickening in {side}."])
    if name == "Lymphadenopathy":
        parts = []
        for n in f["nodes"]:
            parts.append(_pick(rng, [
                f"A lymph node measuring {n['short_axis_mm']:.0f}x{n['long_axis_mm']:.0f} mm is observed in the {n['station']} area.",
                f"An enlarged {n['station']} lymph node with a short axis of {n['short_axis_mm']:.0f} mm was detected.",
                f"There is a pathologically enlarged lymph node in the {n['station']} region ({n['short_axis_mm']:.0f} mm short axis).",
            ]))
        return " ".join(parts)
    if name == "Hiatal hernia":
        return _pick(rng, [f"A hiatal hernia measuring about {f['size_mm']:.0f} mm is observed.",
                           f"There is a {t(1)} above the diaphragm, posterior to the heart.",
                           "A sliding hiatal hernia is seen at the level of the oesophageal hiatus."])
    if name == "Arterial wall calcification":
        where = " and ".join(f["segments"])
        return _pick(rng, [f"Atherosclerotic calcified plaques are observed in the wall of the {where}.",
                           f"Calcified atheroma plaques are seen in the {where}.",
                           f"There is aortic wall calcification in the {where}."])
    if name == "Coronary artery wall calcification":
        where = ", ".join(f["vessels"])
        return _pick(rng, [f"Calcified plaques are observed in the coronary arteries ({where}).",
                           f"Coronary artery calcification is seen along the {where} course.",
                           "There are calcific plaques in the coronary artery walls."])
    if name == "Medical material":
        k = f["kind"]
        return {
            "pacemaker": _pick(rng, ["A cardiac pacemaker is observed in the " + f["where"]
                                     + ", with leads extending to the right heart chambers.",
                                     "Pacemaker generator in the " + f["where"] + " and its leads are seen."]),
            "port catheter": _pick(rng, ["A port catheter is observed in the " + f["where"] + ", its tip in the superior vena cava.",
                                         "A central venous port catheter extending to the superior vena cava is seen."]),
            "nasogastric tube": _pick(rng, ["A nasogastric tube is observed extending through the oesophagus into the stomach.",
                                            "Nasogastric tube is seen in the oesophagus."]),
            "sternotomy wires": _pick(rng, ["Sternotomy wires are observed.", "Sternal wires from previous surgery are seen."]),
        }[k]
    if name == "Cardiomegaly":
        return _pick(rng, ["The heart is enlarged (cardiomegaly).", "Cardiomegaly is observed.",
                           f"Heart size is increased, with a cardiothoracic ratio of about {f['ctr']:.2f}."])
    if name == "Pericardial effusion":
        return _pick(rng, [f"Pericardial effusion reaching {f['thickness_mm']:.0f} mm in thickness is observed.",
                           f"There is pericardial fluid measuring {f['thickness_mm']:.0f} mm.",
                           "Pericardial effusion is seen around the heart."])
    return f"{name} is observed."


def _negation(rng: np.random.Generator, name: str, kb: dict) -> str:
    if name in kb:
        tmpl = _pick(rng, list(kb[name].negations))
        if "{finding}" in tmpl:
            # "{finding} was not observed" needs a singular subject: the name itself
            term = name if tmpl.startswith("{finding}") else _pick(rng, [name] + list(kb[name].synonyms[:1])).lower()
            text = tmpl.replace("{finding}", term)
            return text[0].upper() + text[1:]
        return tmpl
    return _pick(rng, [f"No {name.lower()}.", f"There is no evidence of {name.lower()}."])


# Report sections in CT-RATE order: (findings covered, normal sentences when none is present)
_SECTIONS: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    ((), ("Trachea and both main bronchi are open.", "Trachea, both main bronchi are open.", "The trachea and main bronchi are patent.")),
    (("Cardiomegaly", "Arterial wall calcification", "Coronary artery wall calcification"),
     ("Mediastinal main vascular structures, heart contour and size are normal.",
      "Heart contour and size are normal. Thoracic aorta diameter is normal.")),
    (("Pericardial effusion",), ()),
    (("Hiatal hernia",), ("Thoracic oesophageal calibration is normal.",)),
    (("Lymphadenopathy",), ("No enlarged lymph nodes in prevascular, pre-paratracheal, subcarinal or bilateral hilar-axillary "
                            "pathological dimensions were detected.",)),
    (("Medical material",), ()),
    (("Emphysema", "Lung nodule", "Lung opacity", "Consolidation", "Atelectasis", "Pulmonary fibrotic sequela",
      "Mosaic attenuation pattern", "Interlobular septal thickening", "Bronchiectasis", "Peribronchial thickening"),
     ("When examined in the lung parenchyma window, aeration of both lungs is normal and no nodular or infiltrative lesion is detected.",
      "Both lungs are normally aerated.")),
    (("Pleural effusion",), ("Pleural effusion-thickening was not detected.",)),
    ((), ("Upper abdominal organs included in the sections are normal.",
          "No space-occupying lesion was detected in the liver that entered the cross-sectional area.")),
    ((), ("Bone structures in the study area are natural. Vertebral corpus heights are preserved.", "Bony structures are unremarkable.")),
]


def make_report(rng: np.random.Generator, present: dict[str, int], facts: dict[str, dict[str, Any]], anat: Anatomy | None = None) -> str:
    """CT-RATE-like free text (FINDINGS then IMPRESSION) from the actual lesions.

    Positives get a sentence with location and size; some absent findings get an
    explicit negation (real reports negate selectively, and a model must learn that an
    unmentioned finding is not evidence of its presence).
    """
    try:
        kb = load_knowledge()
    except MedAlignError:
        kb = {}
    sentences: list[str] = []
    if anat is not None and anat.p.get("contrast"):
        sentences.append(_pick(rng, ["Examination was performed with intravenous contrast.", "Contrast-enhanced thoracic CT."]))
    for covered, normal in _SECTIONS:
        pos = [n for n in covered if present.get(n)]
        neg = [n for n in covered if not present.get(n)]
        if pos:
            for n in pos:
                sentences.append(_positive(rng, n, facts.get(n, {}), kb))
        elif normal and rng.random() < 0.6:
            sentences.append(_pick(rng, list(normal)))
        for n in neg:
            if rng.random() < 0.45:
                sentences.append(_negation(rng, n, kb))
    positives = [n for n in CT_RATE_FINDINGS if present.get(n)]
    if positives:
        items = []
        for n in positives:
            f = facts.get(n, {})
            where = f.get("lobe") or (f.get("nodules", [{}])[0].get("lobe") if "nodules" in f else None)
            items.append(f"{_term(rng, kb, n, 1)}{' in the ' + where if where else ''}")
        rng.shuffle(items)
        impression = "; ".join(items)
        impression = impression[0].upper() + impression[1:] + "."
    else:
        impression = _pick(rng, ["Thoracic CT examination within normal limits.", "No significant abnormality.", "Normal chest CT."])
    return "FINDINGS: " + " ".join(sentences) + " IMPRESSION: " + impression


# --------------------------------------------------------------------------------------
# dataset writing
# --------------------------------------------------------------------------------------


def _write_nifti(array: np.ndarray, ijk_to_ras: np.ndarray, path: Path) -> None:
    """Atomic NIfTI write with SimpleITK (RAS affine -> ITK's LPS origin/direction)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    lps = np.diag([-1.0, -1.0, 1.0]) @ m[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps / spacing).ravel()])
    image.SetOrigin([float(v) for v in (np.diag([-1.0, -1.0, 1.0]) @ m[:3, 3])])
    with atomic_output(path) as tmp:
        sitk.WriteImage(image, str(tmp), True)


def _csv_text(rows: list[list[Any]]) -> str:
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _write_case(job: tuple) -> tuple[str, dict[str, int], str]:
    out, seed, index, forced, prevalence = job
    cid = f"phantom_{seed}_{index:05d}"
    ph = make_phantom(case_seed(seed, index), labels=forced, prevalence=prevalence)
    _write_nifti(ph.volume.array, ph.volume.ijk_to_ras, out / "volumes" / f"{cid}.nii.gz")
    _write_nifti(ph.mask, ph.volume.ijk_to_ras, out / "masks" / f"{cid}.nii.gz")
    return cid, ph.labels, ph.report


def write_dataset(out_dir: Path, n: int, seed: int, prevalence: float = 0.3, progress: bool = True,
                  on_progress: Callable[[float, str], None] | None = None, findings: list[str] | None = None,
                  workers: int | None = 1) -> Path:
    """Write ``n`` phantoms: volumes/, masks/, labels.csv, reports.csv, manifest.json.

    Case ``i`` is ``make_phantom(case_seed(seed, i), labels=...)`` so any case can be
    rebuilt alone. ``findings`` restricts which findings may appear (others are forced
    absent); ``on_progress(fraction, message)`` lets the CLI drive its own reporter.
    ``workers`` processes build cases in parallel (None: every core); the files do not
    depend on it.
    """
    forced = None
    if findings is not None:
        _check_labels({f: 1 for f in findings})
        forced = {name: 0 for name in CT_RATE_FINDINGS if name not in set(findings)}
    if int(n) < 1:
        raise InputError(f"The number of phantoms must be at least 1, not {n}.")
    if not 0.0 <= float(prevalence) <= 1.0:
        raise InputError(f"Prevalence must lie between 0 and 1, not {prevalence}.")
    out = Path(out_dir)
    try:
        (out / "volumes").mkdir(parents=True, exist_ok=True)
        (out / "masks").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot create the output folder {out} ({exc.strerror}).") from exc
    label_rows: list[list[Any]] = [["VolumeName", *CT_RATE_FINDINGS]]
    report_rows: list[list[Any]] = [["VolumeName", "report_text"]]
    bar = None
    if progress and on_progress is None:
        from tqdm import tqdm

        bar = tqdm(total=int(n), desc="phantoms", unit="ct")
    try:
        jobs = [(out, int(seed), index, forced, float(prevalence)) for index in range(int(n))]
        for done, (cid, labels, report) in enumerate(ordered_map(_write_case, jobs, workers), start=1):
            label_rows.append([f"{cid}.nii.gz", *[labels[k] for k in CT_RATE_FINDINGS]])
            report_rows.append([f"{cid}.nii.gz", report])
            if bar is not None:
                bar.update(1)
            if on_progress is not None:
                on_progress(done / int(n), cid)
    finally:
        if bar is not None:
            bar.close()
    _write_text(out / "labels.csv", _csv_text(label_rows))
    _write_text(out / "reports.csv", _csv_text(report_rows))
    manifest = {
        "generator": "medalign.synth.phantoms",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "n": int(n),
        "prevalence": float(prevalence),
        "phantom_findings": PHANTOM_FINDINGS,
        "allowed_findings": list(findings) if findings is not None else PHANTOM_FINDINGS,
        "findings_order": CT_RATE_FINDINGS,
        "mask_encoding": "int32 bitmask: bit f set where CT_RATE_FINDINGS[f] is present",
        "case_seed": "numpy SeedSequence([seed, index]).generate_state(1, uint32)[0]",
        "checksum_labels": zlib.crc32(_csv_text(label_rows).encode()) & 0xFFFFFFFF,
    }
    _write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return out
