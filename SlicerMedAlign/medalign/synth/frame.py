"""The chest's frame of reference and tissue densities, shared by the anatomy's organ
steps and by the findings painted onto it.

Coordinates are patient LPS millimetres (x -> left, y -> posterior, z -> superior), the
voxel order of a typical axial CT file; ``z = 0`` is the top of the lung apices. A "body
frame" (u, v) is the LPS axial plane rotated by the patient's small in-plane tilt and
centred on the torso. The outline formulas here are the ones ``build_anatomy`` draws, so
a finding can find the rib cage or the skin without re-deriving them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medalign.synth.shapes import Grid, Slices, ellipsoid

HU_AIR = -1000.0
HU_FAT = -100.0
HU_MUSCLE = 45.0
HU_BLOOD = 40.0
HU_LUNG = -855.0
HU_LIVER = 58.0


TORSO_SQUARENESS = 0.35  # torso outline u² + v² - k·u²·v² = 1 (normalised): boxier than an ellipse


def anterior_skin_v(p: dict[str, Any], u: float) -> float:
    """Body-frame v of the anterior skin at left-right offset ``u`` (``build_anatomy``'s outline)."""
    uu = (u / p["A"]) ** 2
    return -p["B_ant"] * float(np.sqrt((1.0 - uu) / (1.0 - TORSO_SQUARENESS * uu)))


def cage_profile(s: np.ndarray) -> np.ndarray:
    """Rib-cage width relative to its widest (s = 0 at the lung apex, 1 at the base):
    the thorax widens steadily down to the costophrenic angles."""
    return (0.58 + 0.42 * np.sqrt(np.clip(s / 0.85, 0.0, 1.0))).astype(np.float32)


def cavity_level(p: dict[str, Any], grid: Grid, sl: Slices) -> np.ndarray:
    """Normalised rib-cage level (< 1 inside the thoracic cavity) on a voxel box.

    Same formula as the cavity drawn by ``build_anatomy``; findings use it to stay
    inside the chest (an enlarged heart) or to find the subpleural rim (septal lines).
    """
    H, a_c, b_c, vc = p["H"], p["a_c"], p["b_c"], p["vc"]
    U, V = p["U"][sl[1], sl[2]], p["V"][sl[1], sl[2]]
    sZ = (-grid.z[sl[0]] / H).astype(np.float32)
    g = cage_profile(sZ)[:, None, None]
    uu = ((U / np.float32(a_c))[None] / g) ** 2
    vv = (((V - np.float32(vc)) / np.float32(b_c))[None] / (np.float32(0.8) + np.float32(0.2) * g)) ** 2
    return uu + vv - np.float32(0.25) * uu * vv


def heart_level(p: dict[str, Any], grid: Grid, scale: float = 1.0) -> tuple[Slices, np.ndarray] | None:
    """The heart's ellipsoid level on the box of the ellipsoid grown by ``scale``,
    clipped to the rib cage (the pericardial sac cannot leave the chest)."""
    res = ellipsoid(grid, p["heart_c"], p["heart_semi"], p["heart_rot"], scale=scale)
    if res is None:
        return None
    sl, lvl = res
    np.putmask(lvl, cavity_level(p, grid, sl) > np.float32(0.93), np.float32(1e3))
    return sl, lvl


def body_to_lps(p: dict[str, Any], b: np.ndarray) -> np.ndarray:
    """Body frame -> LPS for points (N, 3) or (3,)."""
    b = np.asarray(b, dtype=np.float64)
    c, s = p["cos"], p["sin"]
    x = p["cx"] + c * b[..., 0] - s * b[..., 1]
    y = p["cy"] + s * b[..., 0] + c * b[..., 1]
    return np.stack([x, y, b[..., 2]], axis=-1)
