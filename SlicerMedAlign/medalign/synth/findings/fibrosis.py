"""Pulmonary fibrotic sequela: linear scar bands with some reticulation, and its report sentence."""

from __future__ import annotations

from typing import Any

import numpy as np

from medalign.synth.findings.spec import FindingSpec, Term
from medalign.synth.painting import PaintContext, cos_noise
from medalign.synth.shapes import capsule, ellipsoid, paint
from medalign.synth.wording import pick


def paint_fibrosis(c: PaintContext) -> dict[str, Any]:
    """A few linear scar bands around one point, sometimes with some reticulation
    (volume-loss changes) next to them."""
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
        nz = cos_noise(rng, z, y, x, (6.0, 12.0))
        m = (lvl < 1.0) & (nz > 1.0) & c.lung_free(sl)
        paint(c.hu, sl, m, -300.0)
        c.mark("Pulmonary fibrotic sequela", sl, m, block=True)
    c.force("Pulmonary fibrotic sequela", pc0, 0.0)
    return {"lobe": anat.lobe(pc0), "center_ras": c.ras(pc0), "n_bands": n}


def report_fibrosis(rng: np.random.Generator, f: dict[str, Any], term: Term) -> str:
    """The lobe of the scar."""
    return pick(rng, [f"Fibrotic sequelae changes are observed in the {f['lobe']}.",
                      f"Linear fibrotic bands consistent with sequelae are seen in the {f['lobe']}.",
                      f"There are fibrotic changes in the {f['lobe']}."])


SPECS = (
    FindingSpec("Pulmonary fibrotic sequela", paint_fibrosis, report_fibrosis),
)
