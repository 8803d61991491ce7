"""The lungs: their mask (the cavity above the diaphragm and below the apical domes, minus
the mediastinum, the spine, the heart and every mediastinal tube), the parenchyma's
density, and the vessel trees and segmental bronchi inside them."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from medalign.synth.chest_wall import Cage
from medalign.synth.frame import HU_BLOOD, HU_LUNG, body_to_lps, heart_level
from medalign.synth.mediastinum import MediastinalTubes, body_rotation
from medalign.synth.shapes import Grid, Slices, smoothstep
from medalign.synth.vessel_trees import Branch, bronchi_along, draw_bronchi, grow_tree, sample_lung_points, splat_vessels


def lung_mask(p: dict[str, Any], grid: Grid, cage: Cage, zd: np.ndarray, spine2: np.ndarray, tubes: MediastinalTubes
              ) -> tuple[np.ndarray, np.ndarray, tuple[Slices, np.ndarray] | None, float]:
    """(bool lung mask, int8 labels 1 right / 2 left, the heart's level with its pericardial
    margin, that margin's scale). Carves ``cage.inside`` in place."""
    H, a_c, b_c, vc = p["H"], p["a_c"], p["b_c"], p["vc"]
    u_med, v_tr, r_tr = p["u_med"], p["v_tr"], p["r_tr"]
    Uc, Vc = cage.Uc, cage.Vc
    cbj, cbi = cage.box[1], cage.box[2]
    sZ1 = (-grid.z / H).astype(np.float32)
    Zc = grid.z[:, None, None]
    apex_dome = -0.22 * H * (((np.abs(Uc - u_med) - 0.5 * a_c) / (0.55 * a_c)) ** 2 + ((Vc - vc) / (0.9 * b_c)) ** 2)
    w_med = (14.0 + 10.0 * smoothstep(sZ1 / 0.4)).astype(np.float32)[:, None, None]
    w_ant = (5.0 + 5.0 * smoothstep((sZ1 - 0.1) / 0.3)).astype(np.float32)[:, None, None]
    dist_med = np.abs(Uc - u_med)[None]
    ant = ((Vc - v_tr) < -r_tr)[None]
    lung_m = cage.inside
    lung_m &= Zc > zd[None]
    lung_m &= Zc < apex_dome[None].astype(np.float32)
    lung_m &= ~(np.where(ant, dist_med < w_ant, dist_med < w_med))
    lung_m &= ~spine2[None]
    # carve out the heart with a fat/pericardial margin and every mediastinal tube
    semi_h = p["heart_semi"]
    peri = 1.0 + (p["pericardial_fluid_mm"] + 5.0) / float(semi_h.min())
    hres = heart_level(p, grid, scale=peri)
    lung_full = np.zeros(grid.shape, dtype=bool)
    lung_full[:, cbj, cbi] = lung_m
    del lung_m
    if hres is not None:
        sl, lvl = hres
        lung_full[sl] &= ~(lvl < peri ** 2)
    for sl, dist, rad in tubes.aorta:
        lung_full[sl] &= ~(dist < rad + 4.0)
    for (sl, dist, rad), _ in tubes.vessels:
        lung_full[sl] &= ~(dist < rad + 3.0)
    for (sl, dist, rad), _ in tubes.airways:
        lung_full[sl] &= ~(dist < rad + 2.5)
    lung = lung_full.view(np.int8).copy()  # 1 = right lung
    lc = lung[:, cbj, cbi]
    lc += (lc & ((Uc - u_med) > 0)[None].view(np.int8))  # 2 = left lung
    return lung_full, lung, hres, peri


def parenchyma(rng: np.random.Generator, p: dict[str, Any], grid: Grid, cage: Cage, lung_full: np.ndarray) -> None:
    """Lung density: a gravity gradient (posterior denser) plus a smooth separable texture."""
    sx, sy, _ = p["spacing"]
    vc, b_c = p["vc"], p["b_c"]
    Uc, Vc, hc = cage.Uc, cage.Vc, cage.hu
    zf = grid.z
    lungc_bool = lung_full[:, cage.box[1], cage.box[2]]
    grad = (30.0 * smoothstep(((Vc - vc) / b_c + 0.3) / 1.3)).astype(np.float32)
    base = np.float32(HU_LUNG + rng.uniform(-25, 25))
    t2a = smooth2d(rng, Uc.shape, (sy, sx), 18.0, 14.0)
    t2b = smooth2d(rng, Uc.shape, (sy, sx), 10.0, 10.0)
    za = np.cos(2 * np.pi * zf / rng.uniform(50, 110) + rng.uniform(0, 6.3)).astype(np.float32)[:, None, None]
    zb = np.cos(2 * np.pi * zf / rng.uniform(25, 45) + rng.uniform(0, 6.3)).astype(np.float32)[:, None, None]
    lung_val = t2a[None] * za
    lung_val += t2b[None] * zb
    lung_val += (grad + base)[None]
    np.copyto(hc, lung_val, where=lungc_bool)
    del lung_val
    p["lung_hu"] = float(HU_LUNG)


def vessels_and_bronchi(rng: np.random.Generator, p: dict[str, Any], grid: Grid, hu: np.ndarray, lung: np.ndarray,
                        heart_b: np.ndarray) -> np.ndarray:
    """Vessel trees (arteries from the hila, veins to the left atrium) blended into the lung
    density, then segmental bronchi alongside the first arterial generations. Returns the
    vessel occupancy (float32, 0-1); sets ``p["trees"]`` and ``p["bronchi"]``."""
    semi_h, r_pa = p["heart_semi"], p["r_pa"]
    vessel = np.zeros(grid.shape, dtype=np.float32)
    la = body_to_lps(p, heart_b + np.array([0.0, 0.45 * semi_h[1], 0.25 * semi_h[2]]))
    trees: list[tuple[int, list[Branch], list[Branch], np.ndarray]] = []
    for side, hil, bro in ((1, p["hilumR"], p["bronchusR"]), (2, p["hilumL"], p["bronchusL"])):
        pts = sample_lung_points(rng, grid, lung, side, p["cb"], 1400)
        if len(pts) < 30:
            continue
        art = grow_tree(rng, hil, pts, r0=r_pa * 0.62, depth=8)
        vein_root = la + np.array([-25.0 if side == 1 else 25.0, 0.0, 0.0]) @ body_rotation(p).T
        veins = grow_tree(rng, vein_root, pts[rng.permutation(len(pts))[: len(pts) // 2]], r0=r_pa * 0.5, depth=7)
        trees.append((side, art, veins, bro))
    p["trees"] = trees
    vbox = splat_vessels(rng, grid, vessel, [t[1] for t in trees] + [t[2] for t in trees])
    if vbox is not None:
        vs = vessel[vbox]
        vs *= lung[vbox] > 0
        hv = hu[vbox]
        vessel_hu = np.float32(p["blood_hu"] if p["contrast"] else HU_BLOOD)
        hv += vs * (vessel_hu - hv)
    bronchi = []
    for _side, art, _veins, bro in trees:
        bronchi += bronchi_along(art, max_gen=4, start=bro)
    p["bronchi"] = bronchi
    draw_bronchi(grid, hu, bronchi, lung, wall_mm=1.0, lumen_scale=1.0)
    return vessel


def smooth2d(rng: np.random.Generator, shape: tuple[int, int], spacing: tuple[float, float], sigma_mm: float, amp: float) -> np.ndarray:
    """Smooth 2D random field (unit std scaled to ``amp``): cheap lung texture component."""
    f = rng.standard_normal(shape).astype(np.float32)
    ndimage.gaussian_filter(f, sigma=(sigma_mm / spacing[0], sigma_mm / spacing[1]), output=f, mode="wrap")
    sd = float(f.std()) or 1.0
    return f * np.float32(amp / sd)
