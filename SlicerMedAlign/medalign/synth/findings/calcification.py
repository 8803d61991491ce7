"""Calcified plaques in the aortic wall and along the coronary arteries, each painter beside
its report sentence."""

from __future__ import annotations

from typing import Any

import numpy as np

from medalign.synth.findings.spec import FindingSpec, Term
from medalign.synth.painting import PaintContext
from medalign.synth.shapes import ellipsoid, paint
from medalign.synth.wording import pick


def paint_aortic_calcification(c: PaintContext) -> dict[str, Any]:
    """2-8 dense plaques (350-1000 HU) on the wall of the aortic arch or
    descending aorta."""
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


def report_aortic_calcification(rng: np.random.Generator, f: dict[str, Any], term: Term) -> str:
    """The aortic segments with plaques."""
    where = " and ".join(f["segments"])
    return pick(rng, [f"Atherosclerotic calcified plaques are observed in the wall of the {where}.",
                      f"Calcified atheroma plaques are seen in the {where}.",
                      f"There is aortic wall calcification in the {where}."])


def paint_coronary_calcification(c: PaintContext) -> dict[str, Any]:
    """1-6 small plaques on the heart's surface along the courses of the
    LAD (interventricular groove), right coronary and circumflex (AV groove)."""
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


def report_coronary_calcification(rng: np.random.Generator, f: dict[str, Any], term: Term) -> str:
    """The coronary arteries with plaques."""
    where = ", ".join(f["vessels"])
    return pick(rng, [f"Calcified plaques are observed in the coronary arteries ({where}).",
                      f"Coronary artery calcification is seen along the {where} course.",
                      "There are calcific plaques in the coronary artery walls."])


SPECS = (
    FindingSpec("Arterial wall calcification", paint_aortic_calcification, report_aortic_calcification),
    FindingSpec("Coronary artery wall calcification", paint_coronary_calcification, report_coronary_calcification),
)
