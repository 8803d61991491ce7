"""Emphysema: low-attenuation areas until they cover 6-20% of the lung, and its report sentence."""

from __future__ import annotations

from typing import Any

import numpy as np

from medalign.synth.findings.spec import FindingSpec, Term
from medalign.synth.painting import PaintContext
from medalign.synth.shapes import ellipsoid, paint
from medalign.synth.wording import pick


def paint_emphysema(c: PaintContext) -> dict[str, Any]:
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


def report_emphysema(rng: np.random.Generator, f: dict[str, Any], term: Term) -> str:
    """Kind and the lobes with the most areas."""
    where = " and ".join(f["lobes"]) if f["lobes"] else "both lungs"
    return pick(rng, [
        f"{f['kind'].capitalize()} emphysematous changes are observed, most prominent in the {where}.",
        f"{f['kind'].capitalize()} emphysema is seen in the {where}.",
        f"There are {f['kind']} emphysematous areas in the {where}.",
    ])


SPECS = (
    FindingSpec("Emphysema", paint_emphysema, report_emphysema),
)
