"""Lymph nodes at the mediastinal and hilar stations: enlarged ones (lymphadenopathy) with
their report sentences, and the small normal ones every phantom may have."""

from __future__ import annotations

from typing import Any

import numpy as np

from medalign.synth.anatomy import Anatomy
from medalign.synth.findings.spec import FindingSpec, Term
from medalign.synth.frame import HU_FAT
from medalign.synth.painting import PaintContext, random_rot
from medalign.synth.shapes import ellipsoid, paint
from medalign.synth.wording import pick


def stations(anat: Anatomy) -> dict[str, np.ndarray]:
    """Centres of the lymph-node stations reports name, placed from the carina, aorta
    and hila, in the body frame (u, v, z mm; ``Anatomy.to_world`` takes them to LPS)."""
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


def paint_nodes(c: PaintContext, names: list[str], short_axis: tuple[float, float], finding: str | None) -> list[dict[str, Any]]:
    """Nodes of the given short-axis range at the named stations, placed in
    mediastinal fat; with ``finding`` their voxels carry its bit."""
    rng, anat = c.rng, c.anat
    st = stations(anat)
    out = []
    for name in names:
        sa = float(rng.uniform(*short_axis))
        la = sa * float(rng.uniform(1.0, 1.5))
        semi = np.array([sa / 2, sa / 2, la / 2])
        site = _node_site(c, anat.to_world(*st[name]), semi, random_rot(rng) if la / sa < 1.1 else None)
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


def _node_site(c: PaintContext, station: np.ndarray, semi: np.ndarray, rot: np.ndarray | None
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


def paint_lymphadenopathy(c: PaintContext) -> dict[str, Any]:
    """One to three enlarged nodes (short axis 11-28 mm) at distinct stations."""
    names = list(stations(c.anat))
    k = int(c.rng.integers(1, 4))
    chosen = [names[i] for i in sorted(c.rng.choice(len(names), size=k, replace=False))]
    return {"nodes": paint_nodes(c, chosen, (11.0, 28.0), "Lymphadenopathy")}


def report_lymphadenopathy(rng: np.random.Generator, f: dict[str, Any], term: Term) -> str:
    """One sentence per enlarged node: station and size."""
    parts = []
    for n in f["nodes"]:
        parts.append(pick(rng, [
            f"A lymph node measuring {n['short_axis_mm']:.0f}x{n['long_axis_mm']:.0f} mm is observed in the {n['station']} area.",
            f"An enlarged {n['station']} lymph node with a short axis of {n['short_axis_mm']:.0f} mm was detected.",
            f"There is a pathologically enlarged lymph node in the {n['station']} region ({n['short_axis_mm']:.0f} mm short axis).",
        ]))
    return " ".join(parts)


SPECS = (
    FindingSpec("Lymphadenopathy", paint_lymphadenopathy, report_lymphadenopathy),
)


def paint_normal_nodes(c: PaintContext, enlarged: bool) -> None:
    """Small normal nodes (short axis < 10 mm) at some stations of every phantom without
    lymphadenopathy: size, not presence, is the finding. One draw per station either way,
    so the random stream after it does not depend on the finding."""
    names = [n for n in stations(c.anat) if c.rng.random() < 0.3 and not enlarged]
    paint_nodes(c, names, (4.0, 8.5), None)
