"""Findings of the heart itself: cardiomegaly and pericardial effusion.

They are not painted over a finished anatomy like the others: the lungs and mediastinum
must wrap around an enlarged heart or a fluid rim, so ``build_anatomy`` draws them from
the parameters chosen here, and ``mark_heart`` then sets their mask bits on the heart's
ellipsoid. Their report sentences sit beside them as for every finding.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medalign.synth.findings.spec import FindingSpec, Term
from medalign.synth.frame import cage_profile, heart_level
from medalign.synth.painting import PaintContext
from medalign.synth.wording import pick


def draw_heart(rng: np.random.Generator, present: dict[str, int]) -> tuple[float, float]:
    """(heart scale, pericardial fluid in mm) for ``build_anatomy``. The fluid thickness is
    drawn either way, so the anatomy drawn after it stays the same without the finding."""
    heart_scale = float(rng.uniform(1.22, 1.45)) if present["Cardiomegaly"] else float(rng.uniform(0.88, 1.05))
    peri_mm = float(rng.uniform(5.0, 20.0))
    return heart_scale, (peri_mm if present["Pericardial effusion"] else 0.0)


def mark_heart(c: PaintContext, present: dict[str, int], heart_scale: float, peri_mm: float) -> dict[str, dict[str, Any]]:
    """Set the bits of the enlarged heart and of the pericardial fluid rim (no random draws);
    returns the report facts of those present."""
    p = c.anat.p
    facts: dict[str, dict[str, Any]] = {}
    if not (present["Cardiomegaly"] or present["Pericardial effusion"]):
        return facts
    res = heart_level(p, c.grid, scale=1.0 + (peri_mm + 6) / float(p["heart_semi"].min()))
    if res is not None:
        sl, lvl = res
        if present["Cardiomegaly"]:
            heart = lvl < 1.0
            c.mark("Cardiomegaly", sl, heart)
            c.force("Cardiomegaly", p["heart_c"])
            facts["Cardiomegaly"] = {"scale": round(heart_scale, 2), "ctr": round(_cardiothoracic_ratio(c, sl, heart), 2)}
        if present["Pericardial effusion"]:
            fl = 1.0 + peri_mm / float(p["heart_semi"].min())
            shell = (lvl >= 1.0) & (lvl < fl * fl)
            c.mark("Pericardial effusion", sl, shell)
            facts["Pericardial effusion"] = {"thickness_mm": round(peri_mm, 1)}
    if present["Pericardial effusion"] and not c.has("Pericardial effusion"):
        c.force("Pericardial effusion", p["heart_c"] + p["heart_rot"][1] * p["heart_semi"][1] * 1.05)
    return facts


def _cardiothoracic_ratio(c: PaintContext, sl: tuple[slice, slice, slice], heart: np.ndarray) -> float:
    """Widest transverse heart extent / rib-cage width at the heart's centre."""
    p = c.anat.p
    _, jj, ii = np.nonzero(heart)
    u = p["U"][jj + sl[1].start, ii + sl[2].start]
    cage = 2 * p["a_c"] * float(cage_profile(np.array(-p["heart_c"][2] / p["H"])))
    return float(u.max() - u.min()) / cage if u.size else 0.0


def report_cardiomegaly(rng: np.random.Generator, f: dict[str, Any], term: Term) -> str:
    """Enlarged heart, sometimes with its cardiothoracic ratio."""
    return pick(rng, ["The heart is enlarged (cardiomegaly).", "Cardiomegaly is observed.",
                      f"Heart size is increased, with a cardiothoracic ratio of about {f['ctr']:.2f}."])


def report_pericardial_effusion(rng: np.random.Generator, f: dict[str, Any], term: Term) -> str:
    """The fluid rim's thickness."""
    return pick(rng, [f"Pericardial effusion reaching {f['thickness_mm']:.0f} mm in thickness is observed.",
                      f"There is pericardial fluid measuring {f['thickness_mm']:.0f} mm.",
                      "Pericardial effusion is seen around the heart."])


SPECS = (
    FindingSpec("Cardiomegaly", None, report_cardiomegaly),
    FindingSpec("Pericardial effusion", None, report_pericardial_effusion),
)
