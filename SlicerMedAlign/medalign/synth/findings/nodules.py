"""Lung nodules: one to three solid or ground-glass nodules, and a sentence for each."""

from __future__ import annotations

from typing import Any

import numpy as np

from medalign.synth.findings.spec import FindingSpec, Term
from medalign.synth.painting import PaintContext, cos_noise, random_rot
from medalign.synth.shapes import ellipsoid, paint
from medalign.synth.wording import pick


def paint_lung_nodule(c: PaintContext) -> dict[str, Any]:
    """One to three lobulated nodules (the first 5-30 mm, others smaller), solid or
    ground-glass, each at least its radius away from the lung edge."""
    rng, anat, g = c.rng, c.anat, c.grid
    n = int(rng.choice([1, 1, 1, 2, 3]))
    nodules = []
    for _ in range(n):
        d = float(rng.uniform(5.0, 30.0)) if not nodules else float(rng.uniform(4.0, 12.0))
        r = d / 2
        pc = c.lung_point(margin=r + 3.0)
        if pc is None:
            continue
        res = ellipsoid(g, pc, np.array([r, r, r]) * rng.uniform(0.85, 1.15, size=3), random_rot(rng), scale=1.3)
        solid = rng.random() < 0.8
        val = float(rng.uniform(15.0, 60.0)) if solid else float(rng.uniform(-550.0, -300.0))
        if res is not None:
            sl, lvl = res
            z, y, x = g.axes(sl)
            lob = cos_noise(rng, z - pc[2], y - pc[1], x - pc[0], (max(d, 6.0) * 0.6, max(d, 6.0) * 1.2), n=2)
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


def report_lung_nodule(rng: np.random.Generator, f: dict[str, Any], term: Term) -> str:
    """One sentence per nodule: size, density and lobe."""
    parts = []
    for n in f["nodules"]:
        kind = "solid" if n["solid"] else "ground-glass density"
        parts.append(pick(rng, [
            f"A {n['diameter_mm']:.0f} mm {kind} nodule is observed in the {n['lobe']}.",
            f"In the {n['lobe']}, a {kind} nodular lesion measuring {n['diameter_mm']:.0f} mm was detected.",
            f"There is a {n['diameter_mm']:.0f} mm pulmonary nodule in the {n['lobe']}.",
        ]))
    return " ".join(parts)


SPECS = (
    FindingSpec("Lung nodule", paint_lung_nodule, report_lung_nodule),
)
