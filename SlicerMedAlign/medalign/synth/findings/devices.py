"""Medical material: pacemaker, port catheter, nasogastric tube or sternotomy wires, and its
report sentence."""

from __future__ import annotations

from typing import Any

import numpy as np

from medalign.synth.findings.spec import FindingSpec, Term
from medalign.synth.painting import BIT, PaintContext, paint_tube, streaks
from medalign.synth.shapes import ellipsoid, paint
from medalign.synth.wording import pick


def paint_medical_material(c: PaintContext) -> dict[str, Any]:
    """One device: pacemaker or port with its lead or catheter to the right heart
    (pacemakers with metal streaks), a nasogastric tube, or sternotomy wires."""
    rng, anat, g = c.rng, c.anat, c.grid
    p = anat.p
    kind = str(rng.choice(["pacemaker", "port catheter", "nasogastric tube", "sternotomy wires"]))
    W = anat.to_world
    hc = p["heart_c"]
    marked = np.zeros(g.shape, dtype=bool)

    side = 1.0 if rng.random() < 0.75 else -1.0  # devices usually on the left
    if kind in ("pacemaker", "port catheter"):
        dev_b = np.array([side * 0.55 * p["A"], -(p["B"] * 1.04 - p["fat"] * 0.55), -0.12 * p["H"]])
        dev = W(*dev_b)
        semi = np.array([24.0, 4.5, 20.0]) if kind == "pacemaker" else np.array([12.0, 6.0, 12.0])
        val = 3000.0 if kind == "pacemaker" else float(rng.uniform(1500.0, 2500.0))
        res = ellipsoid(g, dev, semi, None)
        if res is not None:
            sl, lvl = res
            m = lvl < 1.0
            paint(c.hu, sl, m, val)
            marked[sl] |= m
        svc = p["svc"]
        vein = W(side * 45.0, -p["b_c"] * 0.6 + p["vc"], -0.06 * p["H"])
        ra = hc + np.array([-0.55 * p["heart_semi"][0], 0.0, 0.1 * p["heart_semi"][2]])
        path = [dev, vein, svc, ra]
        if kind == "pacemaker":
            path.append(hc + p["heart_rot"].T @ np.array([0.6 * p["heart_semi"][0], -0.2 * p["heart_semi"][1], -0.3 * p["heart_semi"][2]]))
            paint_tube(c, path, 1.1, 2500.0, marked)
            streaks(c, dev, amp=float(rng.uniform(120.0, 300.0)))
        else:
            paint_tube(c, path[:3] + [svc + (ra - svc) * 0.5], 1.3, float(rng.uniform(150.0, 400.0)), marked)
        where = f"{'left' if side > 0 else 'right'} anterior chest wall"
    elif kind == "nasogastric tube":
        es = p["es_pts"]
        st = W(0.45 * p["a_c"], p["vc"] - 0.1 * p["b_c"], p["zL"] - 40.0)
        paint_tube(c, [es[0], es[1], es[2], st], 2.2, float(rng.uniform(200.0, 450.0)), marked)
        where = "oesophagus towards the stomach"
    else:
        b_st = -(p["b_c"] - p["vc"]) - 3.0
        for z in np.linspace(-0.18 * p["H"], -0.62 * p["H"], int(rng.integers(4, 7))):
            pts = [W(-20.0, b_st + 2, z), W(-12.0, b_st - 9, z), W(12.0, b_st - 9, z), W(20.0, b_st + 2, z)]
            paint_tube(c, pts, 1.0, 3000.0, marked)
        where = "sternum"
    c.mask[marked] |= BIT["Medical material"]
    if not marked.any():
        c.force("Medical material", hc, 3000.0)
    return {"kind": kind, "where": where}


def report_medical_material(rng: np.random.Generator, f: dict[str, Any], term: Term) -> str:
    """The device and where it lies. Every device's sentence is drawn, then the painted one
    is kept: the report stream stays as generator 1.3 draws it."""
    k = f["kind"]
    return {
        "pacemaker": pick(rng, ["A cardiac pacemaker is observed in the " + f["where"]
                                + ", with leads extending to the right heart chambers.",
                                "Pacemaker generator in the " + f["where"] + " and its leads are seen."]),
        "port catheter": pick(rng, ["A port catheter is observed in the " + f["where"] + ", its tip in the superior vena cava.",
                                    "A central venous port catheter extending to the superior vena cava is seen."]),
        "nasogastric tube": pick(rng, ["A nasogastric tube is observed extending through the oesophagus into the stomach.",
                                       "Nasogastric tube is seen in the oesophagus."]),
        "sternotomy wires": pick(rng, ["Sternotomy wires are observed.", "Sternal wires from previous surgery are seen."]),
    }[k]


SPECS = (
    FindingSpec("Medical material", paint_medical_material, report_medical_material),
)
