"""The mediastinum: landmarks (midline, trachea, carina), the heart's ellipsoid, the aorta,
pulmonary arteries, superior vena cava (with undiluted contrast arriving in some
contrast scans), supra-aortic branches, oesophagus, trachea and main bronchi.

The geometry is decided before the lungs are drawn (they are carved around it); the
tubes are painted after the lungs, with ``paint_heart`` and ``paint_tubes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medalign.synth.frame import HU_BLOOD, HU_FAT, HU_MUSCLE, body_to_lps
from medalign.synth.shapes import Grid, Slices, capsule, paint, rotation

Tube = tuple[np.ndarray, np.ndarray, float, float, float]  # p0, p1 (LPS), r0, r1, HU
Capsule = tuple[Slices, np.ndarray, np.ndarray]  # box, distance to the axis, radius


def body_rotation(p: dict[str, Any]) -> np.ndarray:
    """Body frame -> LPS rotation (the patient's in-plane tilt)."""
    c, s = p["cos"], p["sin"]
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float32)


def landmarks(rng: np.random.Generator, p: dict[str, Any]) -> None:
    """Midline offset, trachea (anterior to the spine and oesophagus) and carina height."""
    H = p["H"]
    u_med = float(rng.uniform(-6.0, 6.0))
    p["u_med"] = u_med
    v_tr = p["v_vb"] - p["r_vb"] - 22.0  # trachea anterior to the spine / oesophagus
    z_car = -H * float(rng.uniform(0.34, 0.42))
    r_tr = float(rng.uniform(8.0, 10.5))
    p.update(v_tr=float(v_tr), z_car=float(z_car), r_tr=r_tr)


def heart_geometry(rng: np.random.Generator, p: dict[str, Any], heart_scale: float, pericardial_fluid_mm: float) -> np.ndarray:
    """The heart: an oblique ellipsoid resting on the diaphragm, apex left-anterior-inferior;
    big hearts are wider and lie more transversely. Returns its centre in the body frame."""
    a_c, b_c, vc = p["a_c"], p["b_c"], p["vc"]
    hs = heart_scale
    semi_h = np.array([0.44 * a_c * hs, min(0.56 * b_c * (1 + 0.3 * (hs - 1)), 0.7 * b_c), 0.37 * a_c * (1 + 0.4 * (hs - 1))])
    yaw = -np.deg2rad(rng.uniform(28.0, 45.0) - 25.0 * (hs - 1))  # big hearts lie more transversely
    pitch_h = np.deg2rad(rng.uniform(12.0, 25.0))
    rot_b = rotation(yaw, pitch_h)
    heart_b = np.array([0.12 * a_c + 0.25 * (hs - 1) * a_c, vc - 0.30 * b_c, max(p["zR"], p["zL"]) + 0.62 * semi_h[2]])
    rot_h = rot_b @ body_rotation(p).T
    heart_c = body_to_lps(p, heart_b)
    p.update(heart_c=heart_c, heart_semi=semi_h, heart_rot=rot_h, heart_scale=hs, pericardial_fluid_mm=pericardial_fluid_mm)
    return heart_b


def aorta(rng: np.random.Generator, p: dict[str, Any], heart_b: np.ndarray) -> np.ndarray:
    """Centre line root -> ascending -> arch (posterior-left) -> descending -> abdomen, and
    radii tapering after the arch. Returns the centre line in the body frame."""
    H, semi_h = p["H"], p["heart_semi"]
    r_asc = float(rng.uniform(13.0, 17.0))
    r_desc = r_asc * float(rng.uniform(0.72, 0.82))
    root = np.array([heart_b[0] - 0.25 * semi_h[0], heart_b[1] + 0.15 * semi_h[1], heart_b[2] + 0.45 * semi_h[2]])
    asc_top = np.array([root[0] - 14.0, root[1] - 6.0, -0.26 * H])
    desc_top = np.array([22.0 + p["u_med"], p["v_vb"] - p["r_vb"] - 4.0, -0.26 * H])
    arch_h = float(rng.uniform(18.0, 30.0))
    pts = [root, root + (asc_top - root) * 0.5, asc_top]
    for t in np.linspace(0.0, 1.0, 9)[1:-1]:
        q = asc_top + (desc_top - asc_top) * t
        q = q + np.array([0.0, 0.0, arch_h * np.sin(np.pi * t)])
        pts.append(q)
    pts += [desc_top, np.array([desc_top[0] - 4.0, desc_top[1], -0.6 * H]),
            np.array([desc_top[0] - 10.0, desc_top[1] + 2.0, p["z_bot"] - 20.0])]
    aorta_b = np.array(pts)
    n_a = len(aorta_b)
    i_arch = 3
    radii = np.concatenate([np.full(i_arch, r_asc), np.linspace(r_asc, r_desc, n_a - i_arch)])
    p["aorta_pts"] = body_to_lps(p, aorta_b)
    p["aorta_r"] = radii
    return aorta_b


def blood_hu(rng: np.random.Generator, contrast: bool) -> float:
    """Blood density: enhanced (180-320 HU) in a contrast scan, about 40 HU otherwise."""
    return float(rng.uniform(180, 320)) if contrast else HU_BLOOD + float(rng.uniform(-5, 8))


def great_vessels(rng: np.random.Generator, p: dict[str, Any], heart_b: np.ndarray, aorta_b: np.ndarray
                  ) -> tuple[list[Tube], np.ndarray, np.ndarray]:
    """Pulmonary trunk and arteries to the hila, superior vena cava (with the undiluted
    contrast inflow of some contrast scans), supra-aortic branches and the oesophagus.
    Returns the tubes and both hila in the body frame (the main bronchi head for them)."""
    H, a_c, b_c, vc = p["H"], p["a_c"], p["b_c"], p["vc"]
    u_med, v_tr, z_car, r_tr, z_top = p["u_med"], p["v_tr"], p["z_car"], p["r_tr"], p["z_top"]
    semi_h, blood, contrast = p["heart_semi"], p["blood_hu"], p["contrast"]
    root, r_asc = aorta_b[0], float(p["aorta_r"][0])
    _w = body_to_lps
    pa_start = np.array([heart_b[0] + 0.05 * semi_h[0], heart_b[1] - 0.35 * semi_h[1], heart_b[2] + 0.35 * semi_h[2]])
    pa_bif = np.array([u_med + 8.0, v_tr + 5.0, z_car - 18.0])
    hil_z = z_car - float(rng.uniform(22.0, 32.0))
    hilumR = np.array([u_med - 0.2 * a_c - 12.0, v_tr + 8.0, hil_z])
    hilumL = np.array([u_med + 0.2 * a_c + 16.0, v_tr + 10.0, hil_z + 4.0])
    r_pa = float(rng.uniform(11.0, 14.0))
    p["r_pa"] = r_pa
    svc_b = np.array([root[0] - r_asc - 12.0, root[1] - 2.0])
    tubes: list[Tube] = []
    tubes.append((_w(p, pa_start), _w(p, pa_bif), r_pa, r_pa, blood))
    tubes.append((_w(p, pa_bif), _w(p, hilumR), r_pa * 0.8, r_pa * 0.7, blood))
    tubes.append((_w(p, pa_bif), _w(p, hilumL), r_pa * 0.8, r_pa * 0.7, blood))
    svc_lo = np.array([svc_b[0], svc_b[1], heart_b[2] + 0.5 * semi_h[2]])
    svc_hi = np.array([svc_b[0] - 4, svc_b[1], z_top + 10])
    p["inflow"] = None
    if contrast and rng.random() < 0.5 and p.get("phase") != "venous":  # none left by the portal-venous phase
        # Undiluted contrast still arriving through an arm vein: 800-2500 HU in the
        # brachiocephalic vein and upper SVC, as in most real contrast chest CTs.
        dense = float(rng.uniform(800.0, 2500.0))
        side = 1.0 if rng.random() < 0.35 else -1.0  # usually the right arm
        junction = svc_lo + (svc_hi - svc_lo) * 0.55
        arm = np.array([side * 0.75 * a_c, vc - 0.55 * b_c, z_top + 5.0])
        tubes.append((_w(p, svc_lo), _w(p, junction), 9.0, 9.0, blood + 0.35 * (dense - blood)))
        tubes.append((_w(p, junction), _w(p, arm), 6.5, 5.5, dense))
        svc_lo = junction
        p["inflow"] = _w(p, junction + (arm - junction) * 0.3)
    tubes.append((_w(p, svc_lo), _w(p, svc_hi), 9.0, 9.0, blood * 0.9))
    arch_top = aorta_b[5]
    for du_, rr in ((-14.0, 6.5), (2.0, 5.0), (12.0, 5.0)):
        q0 = arch_top + np.array([du_, 0.0, 0.0])
        tubes.append((_w(p, q0), _w(p, q0 + np.array([du_ * 0.6, -6.0, z_top + 10 - q0[2]])), rr, rr, blood))
    es_top = np.array([u_med + 6.0, v_tr + r_tr + 8.0, z_top + 10])
    es_mid = np.array([u_med + 8.0, p["v_vb"] - p["r_vb"] - 9.0, z_car - 40.0])
    es_bot = np.array([0.25 * a_c, vc - 0.05 * b_c, p["zL"] - 20.0])
    tubes.append((_w(p, es_top), _w(p, es_mid), 7.0, 7.0, 38.0))
    tubes.append((_w(p, es_mid), _w(p, es_bot), 7.0, 8.0, 38.0))
    p.update(hilumR=_w(p, hilumR), hilumL=_w(p, hilumL), es_pts=_w(p, np.array([es_top, es_mid, es_bot])),
             pa_bif=_w(p, pa_bif), svc=_w(p, np.array([svc_b[0], svc_b[1], -0.3 * H])))
    return tubes, hilumR, hilumL


@dataclass
class MediastinalTubes:
    """Every tube of the mediastinum evaluated on its box: the lungs are carved around
    them, then they are painted (aortic wall and lumen, vessels, airway walls and air)."""

    aorta: list[Capsule]
    vessels: list[tuple[Capsule, float]]  # with their HU; the last two are the oesophagus
    airways: list[tuple[Capsule, float]]  # with their wall thickness (mm)


def mediastinal_tubes(p: dict[str, Any], grid: Grid, tubes: list[Tube], hilumR_b: np.ndarray, hilumL_b: np.ndarray) -> MediastinalTubes:
    """Capsules of the aorta, the other tubes, the trachea and both main bronchi."""
    P, radii = p["aorta_pts"], p["aorta_r"]
    aorta_caps = []
    for a in range(len(P) - 1):
        cap = capsule(grid, P[a], P[a + 1], radii[a], radii[a + 1], pad=4.0)
        if cap is not None:
            aorta_caps.append(cap)
    tube_caps = []
    for (q0, q1, r0, r1, val) in tubes:
        cap = capsule(grid, q0, q1, r0, r1, pad=4.0)
        if cap is not None:
            tube_caps.append((cap, val))
    u_med, v_tr, z_car, r_tr = p["u_med"], p["v_tr"], p["z_car"], p["r_tr"]
    carina = body_to_lps(p, np.array([u_med, v_tr, z_car]))
    top = body_to_lps(p, np.array([u_med - 2.0, v_tr - 4.0, p["z_top"] + 10.0]))
    bR = body_to_lps(p, hilumR_b + np.array([8.0, 6.0, 10.0]))
    bL = body_to_lps(p, hilumL_b + np.array([-8.0, 6.0, 10.0]))
    r_b = r_tr * 0.68
    airway_caps = []
    for q0, q1, r0, r1 in ((top, carina, r_tr, r_tr * 0.95), (carina, bR, r_b * 1.05, r_b * 0.9), (carina, bL, r_b, r_b * 0.85)):
        cap = capsule(grid, q0, q1, r0, r1, pad=4.0)
        if cap is not None:
            airway_caps.append((cap, 2.0))
    p.update(carina=carina, bronchusR=bR, bronchusL=bL)
    return MediastinalTubes(aorta=aorta_caps, vessels=tube_caps, airways=airway_caps)


def paint_heart(rng: np.random.Generator, p: dict[str, Any], grid: Grid, hu: np.ndarray,
                hres: tuple[Slices, np.ndarray] | None, peri: float) -> None:
    """Epicardial fat, any pericardial fluid, the myocardium and blood; in contrast scans the
    four chambers (ventricles either side of the septum, atria at the base)."""
    if hres is None:
        return
    semi_h, heart_c, rot_h = p["heart_semi"], p["heart_c"], p["heart_rot"]
    blood, contrast, pericardial_fluid_mm = p["blood_hu"], p["contrast"], p["pericardial_fluid_mm"]
    sl, lvl = hres
    fat_shell = lvl < (peri - 1.0 / float(semi_h.min()) * 1.0) ** 2
    paint(hu, sl, fat_shell, HU_FAT + 10.0)
    if pericardial_fluid_mm > 0:
        fl = 1.0 + pericardial_fluid_mm / float(semi_h.min())
        paint(hu, sl, lvl < fl ** 2, float(rng.uniform(5.0, 20.0)))
    paint(hu, sl, lvl < 1.0, HU_MUSCLE + 5.0 if contrast else blood + 3.0)
    if contrast:
        z_, y_, x_ = grid.axes(sl)
        dx_, dy_, dz_ = x_ - heart_c[0], y_ - heart_c[1], z_ - heart_c[2]
        q = [(rot_h[a, 0] * dx_ + rot_h[a, 1] * dy_ + rot_h[a, 2] * dz_) / np.float32(semi_h[a]) for a in range(3)]
        inside = lvl < 0.8
        for c0, c1, c2, r0, r1, r2, val in (
            (0.15, 0.32, 0.0, 0.62, 0.42, 0.55, blood),  # left ventricle (posterior-left)
            (-0.05, -0.42, 0.05, 0.6, 0.3, 0.55, blood * 0.92),  # right ventricle (anterior-right)
            (-0.6, 0.35, 0.35, 0.35, 0.35, 0.35, blood),  # left atrium (posterior, base)
            (-0.62, -0.25, 0.1, 0.35, 0.3, 0.4, blood * 0.85),  # right atrium (right, base)
        ):
            lv = ((q[0] - c0) / r0) ** 2 + ((q[1] - c1) / r1) ** 2 + ((q[2] - c2) / r2) ** 2
            paint(hu, sl, inside & (lv < 1.0), val)


def paint_tubes(hu: np.ndarray, tubes: MediastinalTubes, blood: float) -> None:
    """Aortic wall then lumen, the other vessels and the oesophagus (a little air in its
    lumen), airway walls then air."""
    for sl, dist, rad in tubes.aorta:
        paint(hu, sl, dist < rad + 1.5, 45.0)
    for sl, dist, rad in tubes.aorta:
        paint(hu, sl, dist < rad, blood)
    for (sl, dist, rad), val in tubes.vessels:
        paint(hu, sl, dist < rad, val)
    for (sl, dist, _rad), _ in tubes.vessels[-2:]:  # a little air in the oesophageal lumen
        paint(hu, sl, dist < 1.6, -600.0)
    for (sl, dist, rad), wall_ in tubes.airways:
        paint(hu, sl, dist < rad + wall_, 50.0)
    for (sl, dist, rad), _ in tubes.airways:
        paint(hu, sl, dist < rad, -990.0)
