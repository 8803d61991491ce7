"""Airspace disease: ground-glass lung opacity and lobar consolidation with air bronchograms,
each painter beside its report sentence."""

from __future__ import annotations

from typing import Any

import numpy as np

from medalign.synth.anatomy import Anatomy
from medalign.synth.findings.spec import FindingSpec, Term
from medalign.synth.painting import PaintContext, blob_region
from medalign.synth.wording import pick


def paint_lung_opacity(c: PaintContext) -> dict[str, Any]:
    """One to three irregular ground-glass blobs (-560..-330 HU, textured); the
    vessels inside stay visible because the blob only raises darker voxels."""
    rng, anat = c.rng, c.anat
    n = int(rng.integers(1, 4))
    lobes, sizes = [], []
    val = float(rng.uniform(-560.0, -330.0))
    for _ in range(n):
        pc = c.lung_point(margin=12.0)
        if pc is None:
            continue
        semi = rng.uniform(14.0, 40.0, size=3)
        res = blob_region(c, pc, semi, 0.35)
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


def report_lung_opacity(rng: np.random.Generator, f: dict[str, Any], term: Term) -> str:
    """The lobes holding the opacities."""
    where = " and ".join(sorted(set(f["lobes"])))
    return pick(rng, [
        f"Ground glass opacities are observed in the {where}.",
        f"Patchy ground-glass density areas are seen in the {where}.",
        f"There are areas of increased density (lung opacity) in the {where}.",
    ])


def paint_consolidation(c: PaintContext) -> dict[str, Any]:
    """A near-water-density blob kept within one lobe (fissures bound lobar
    consolidation), with air bronchograms where the vessel tree runs through it."""
    rng, anat, g = c.rng, c.anat, c.grid
    pc = c.lung_point(margin=15.0, zone=str(rng.choice(["lower", "upper"])))
    if pc is None:
        pc = c.lung_point()
    lobe = anat.lobe(pc)
    semi = rng.uniform(18.0, 45.0, size=3)
    res = blob_region(c, pc, semi, 0.25)
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


def report_consolidation(rng: np.random.Generator, f: dict[str, Any], term: Term) -> str:
    """Lobe and size, always with air bronchograms (they are painted)."""
    return pick(rng, [
        f"An area of consolidation containing air bronchograms is observed in the {f['lobe']}, "
        f"measuring about {f['size_mm'] / 10:.1f} cm.",
        f"Consolidation with air bronchograms is seen in the {f['lobe']}.",
        f"There is {term()} in the {f['lobe']} with air bronchograms.",
    ])


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


SPECS = (
    FindingSpec("Lung opacity", paint_lung_opacity, report_lung_opacity),
    FindingSpec("Consolidation", paint_consolidation, report_consolidation),
)
