"""Atelectasis: plate-like bands or dependent collapse beside an effusion, and its report sentence."""

from __future__ import annotations

from typing import Any

import numpy as np

from medalign.synth.findings.spec import FindingSpec, Term
from medalign.synth.painting import BIT, PaintContext
from medalign.synth.shapes import ellipsoid, paint
from medalign.synth.wording import pick


def paint_atelectasis(c: PaintContext) -> dict[str, Any]:
    """Either dependent collapse at the posterior base (just anterior to any
    effusion, as passive atelectasis lies) or a thin plate-like band in a lower zone."""
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


def report_atelectasis(rng: np.random.Generator, f: dict[str, Any], term: Term) -> str:
    """Plate-like or dependent, in the lobe the lesion lies in."""
    if f["kind"] == "plate":
        return pick(rng, [f"Plate-like atelectasis is observed in the {f['lobe']}.",
                          f"Linear atelectasis is seen in the {f['lobe']}.",
                          f"Subsegmental atelectatic changes are noted in the {f['lobe']}."])
    return pick(rng, [f"Atelectasis is observed in the posterobasal part of the {f['lobe']}.",
                      f"Compressive atelectatic changes are seen in the dependent {f['lobe']}.",
                      f"There is dependent atelectasis in the {f['lobe']}."])


SPECS = (
    FindingSpec("Atelectasis", paint_atelectasis, report_atelectasis),
)
