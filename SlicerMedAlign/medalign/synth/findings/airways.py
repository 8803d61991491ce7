"""Airway findings drawn along the bronchial tree: bronchiectasis (a widened sub-tree) and
peribronchial thickening (thick walls), each painter beside its report sentence."""

from __future__ import annotations

from typing import Any

import numpy as np

from medalign.synth.findings.spec import FindingSpec, Term
from medalign.synth.painting import BIT, PaintContext
from medalign.synth.vessel_trees import Branch, bronchi_along, draw_bronchi
from medalign.synth.wording import pick


def _subtree(c: PaintContext, gen_root: int) -> tuple[list[Branch], int]:
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


def paint_bronchiectasis(c: PaintContext) -> dict[str, Any]:
    """The bronchi of one segment's sub-tree drawn 1.4-2.2 times as wide as
    normal with thick walls (varicose when wider than 1.8)."""
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


def report_bronchiectasis(rng: np.random.Generator, f: dict[str, Any], term: Term) -> str:
    """Kind (cylindrical or varicose) and lobe."""
    return pick(rng, [f"{f['kind'].capitalize()} bronchiectasis is observed in the {f['lobe']}.",
                      f"Bronchiectatic changes with bronchial wall thickening are seen in the {f['lobe']}.",
                      f"There is {f['kind']} bronchiectasis in the {f['lobe']}, "
                      "the bronchi being wider than the accompanying arteries."])


def paint_peribronchial(c: PaintContext) -> dict[str, Any]:
    """Thick walls (2.2-3.8 mm) around the bronchi of one or both lungs; the
    mask is the wall, not the air lumen."""
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


def report_peribronchial(rng: np.random.Generator, f: dict[str, Any], term: Term) -> str:
    """One lung or both."""
    side = "both lungs" if len(f["sides"]) > 1 else f"the {f['sides'][0]} lung"
    return pick(rng, [f"Peribronchial thickening is observed in {side}.",
                      f"Bronchial wall thickening (peribronchial cuffing) is seen in {side}.",
                      f"There is peribronchial wall thickening in {side}."])


SPECS = (
    FindingSpec("Bronchiectasis", paint_bronchiectasis, report_bronchiectasis),
    FindingSpec("Peribronchial thickening", paint_peribronchial, report_peribronchial),
)
