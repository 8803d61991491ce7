"""Pleural effusion: dependent fluid along the posterior chest wall, and its report sentence."""

from __future__ import annotations

from typing import Any

import numpy as np

from medalign.synth.findings.spec import FindingSpec, Term
from medalign.synth.frame import cavity_level
from medalign.synth.painting import PaintContext, lung_box
from medalign.synth.wording import pick, sides_phrase


def paint_pleural_effusion(c: PaintContext) -> dict[str, Any]:
    """Dependent fluid: a crescent hugging the posterior chest wall, filling up to a
    nearly horizontal level (supine patient) when large, tapering upwards."""
    rng, anat, g = c.rng, c.anat, c.grid
    p = anat.p
    sides = [[1], [2], [1, 2]][int(rng.choice(3, p=[0.35, 0.25, 0.4]))]
    sl = lung_box(c)
    Z = g.z[sl[0]][:, None, None]
    V = p["V"][sl[1], sl[2]][None]
    rho = np.sqrt(cavity_level(p, g, sl))
    v_post = p["vc"] + p["b_c"]
    post = np.clip((V - p["vc"]) / p["b_c"] + 0.2, 0.0, 1.0) ** 1.5  # none anteriorly, thickest at the back
    lung = anat.lung[sl]
    out = {"sides": [], "depth_mm": []}
    for side in sides:
        depth = float(rng.uniform(12.0, 55.0))
        z_lim = -p["H"] * float(rng.uniform(0.35, 0.6))
        for _ in range(4):
            taper = np.clip((z_lim - Z) / 45.0, 0.0, 1.0)
            shell = rho > 1.0 - (depth / p["b_c"]) * taper * post  # crescent along the wall
            level = V > v_post - 0.75 * depth * taper  # fluid level of a larger effusion
            fluid = (lung == side) & (shell | level)
            if fluid.any():
                break
            depth *= 1.5
            z_lim += 20.0
        hu = np.float32(rng.uniform(5.0, 18.0))
        sub = c.hu[sl]
        np.copyto(sub, hu, where=fluid)
        c.mark("Pleural effusion", sl, fluid, block=True)
        out["sides"].append("right" if side == 1 else "left")
        out["depth_mm"].append(round(depth, 1))
    return out


def report_pleural_effusion(rng: np.random.Generator, f: dict[str, Any], term: Term) -> str:
    """Side and greatest thickness, as CT-RATE reports give them."""
    side = sides_phrase(f["sides"])
    d = max(f["depth_mm"]) / 10.0
    return pick(rng, [
        f"{side.capitalize()} pleural effusion is observed, measuring {d:.1f} cm in its thickest part.",
        f"There is {side} pleural effusion with a maximum thickness of {d:.1f} cm.",
        f"{side.capitalize()} pleural fluid is seen in the dependent pleural space, about {d:.1f} cm thick.",
    ])


SPECS = (
    FindingSpec("Pleural effusion", paint_pleural_effusion, report_pleural_effusion),
)
