"""Diffuse lung patterns filling the free lung: mosaic attenuation and interlobular septal
thickening, each painter beside its report sentence."""

from __future__ import annotations

from typing import Any

import numpy as np

from medalign.synth.findings.spec import FindingSpec, Term
from medalign.synth.frame import cavity_level
from medalign.synth.lungs import smooth2d
from medalign.synth.painting import PaintContext, lung_box
from medalign.synth.wording import pick


def _field2d(rng: np.random.Generator, c: PaintContext, sl: tuple[slice, slice, slice], wl: tuple[float, float]) -> np.ndarray:
    """Smooth random 3D field on a box, built separably (2D smooth field x 1D cosine in z
    plus a second such pair) so patchy patterns cost a few passes, not a 3D filter."""
    g = c.grid
    shape2 = (sl[1].stop - sl[1].start, sl[2].stop - sl[2].start)
    z = g.z[sl[0]]
    out = None
    for _ in range(2):
        f2 = smooth2d(rng, shape2, (g.spacing[1], g.spacing[0]), float(rng.uniform(*wl)) / 3.0, 1.0)
        fz = np.cos(2 * np.pi * z / rng.uniform(wl[0] * 1.5, wl[1] * 2.0) + rng.uniform(0, 6.3)).astype(np.float32)
        term = f2[None] * (np.float32(0.6) + np.float32(0.4) * fz[:, None, None])
        out = term if out is None else out + term
    return out * np.float32(1.0 / np.sqrt(2.0))


def paint_mosaic(c: PaintContext) -> dict[str, Any]:
    """Patchy darker and brighter lung (air trapping beside normal perfusion) in one
    zone, from a smooth random field."""
    rng, anat, g = c.rng, c.anat, c.grid
    zone = str(rng.choice(["bilateral", "lower", "right", "left"]))
    sl = lung_box(c)
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


def report_mosaic(rng: np.random.Generator, f: dict[str, Any], term: Term) -> str:
    """The zone of the pattern."""
    zone = {"bilateral": "both lungs", "lower": "both lower lobes", "right": "the right lung", "left": "the left lung"}[f["zone"]]
    return pick(rng, [f"A mosaic attenuation pattern is observed in {zone}.",
                      f"Mosaic attenuation is seen in {zone}, suggesting small airway disease or air trapping.",
                      f"There is a mosaic perfusion pattern in {zone}."])


def paint_septal(c: PaintContext) -> dict[str, Any]:
    """Thickened septa outline secondary lobules (1-2.5 cm polygons), subpleural first.

    The network is built from 2D Voronoi tessellations (cheap) stacked along z, so its
    cost is 2D work plus one 3D gather instead of a 3D distance computation.
    """
    rng, anat, g = c.rng, c.anat, c.grid
    p = anat.p
    zone = str(rng.choice(["basal", "bilateral", "right", "left"]))
    sl = lung_box(c)
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


def report_septal(rng: np.random.Generator, f: dict[str, Any], term: Term) -> str:
    """The zone of the thickened septa."""
    zone = {"basal": "the basal segments of both lungs", "bilateral": "the subpleural areas of both lungs",
            "right": "the subpleural right lung", "left": "the subpleural left lung"}[f["zone"]]
    return pick(rng, [f"Interlobular septal thickening is observed in {zone}.",
                      f"Thickened interlobular septa are seen in {zone}.",
                      f"There is septal thickening in {zone}."])


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


SPECS = (
    FindingSpec("Mosaic attenuation pattern", paint_mosaic, report_mosaic),
    FindingSpec("Interlobular septal thickening", paint_septal, report_septal),
)
