"""Hiatal hernia: stomach above the diaphragm behind the heart, and its report sentence."""

from __future__ import annotations

from typing import Any

import numpy as np

from medalign.synth.findings.spec import FindingSpec, Term
from medalign.synth.frame import HU_AIR
from medalign.synth.painting import PaintContext
from medalign.synth.shapes import ellipsoid, paint
from medalign.synth.wording import pick


def paint_hiatal_hernia(c: PaintContext) -> dict[str, Any]:
    """Part of the stomach above the diaphragm behind the heart: a soft-tissue wall
    around air over fluid (the level depends on the patient lying supine)."""
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


def report_hiatal_hernia(rng: np.random.Generator, f: dict[str, Any], term: Term) -> str:
    """Size, or the finding's name or first synonym."""
    return pick(rng, [f"A hiatal hernia measuring about {f['size_mm']:.0f} mm is observed.",
                      f"There is a {term(1)} above the diaphragm, posterior to the heart.",
                      "A sliding hiatal hernia is seen at the level of the oesophageal hiatus."])


SPECS = (
    FindingSpec("Hiatal hernia", paint_hiatal_hernia, report_hiatal_hernia),
)
