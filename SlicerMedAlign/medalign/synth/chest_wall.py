"""The chest wall and what lies below it: torso outline and table, the rib cage's cavity,
ribs, spine, sternum, the diaphragm's domes and the upper abdominal organs under them.

Each step draws onto the HU volume in ``build_anatomy``'s order (their random draws are
part of what a seed means). Full-volume work stays inside the rib-cage box (``Cage``);
the torso wall is a 2D image broadcast over slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medalign.synth.frame import HU_AIR, HU_FAT, HU_LIVER, HU_MUSCLE, TORSO_SQUARENESS, body_to_lps, cage_profile
from medalign.synth.shapes import Grid, Slices, ellipsoid, paint, rotation, smoothstep
from medalign.synth.shift import ORGAN_ENHANCEMENT


@dataclass
class Cage:
    """The rib-cage box and what later steps need on it."""

    box: Slices  # voxel box of the rib cage (+ ribs); all later 3D work happens inside it
    Uc: np.ndarray  # body-frame u on the box (2D)
    Vc: np.ndarray  # body-frame v on the box (2D)
    hu: np.ndarray  # view of the HU volume on the box
    level: np.ndarray | None  # normalised cavity level (< 1 inside the ribs); freed after the ribs
    inside: np.ndarray  # level < 1 (the lung mask is carved from it, in place)


def torso_wall(p: dict[str, Any], grid: Grid) -> np.ndarray:
    """The HU volume with skin, subcutaneous fat, muscle and the table drawn in every slice."""
    A, B = p["A"], p["B"]
    X2, Y2 = grid.x[None, :], grid.y[:, None]
    U, V = p["U"], p["V"]
    fat = p["fat"]
    B_ant, B_post = B * 1.04, B * 0.96
    p["B_ant"] = B_ant

    def torso(a: float, b_ant: float, b_post: float) -> np.ndarray:
        uu = (U / a) ** 2
        vv = (V / np.where(V < 0, b_ant, b_post)) ** 2
        return uu + vv - TORSO_SQUARENESS * uu * vv

    tissue2 = np.full(U.shape, HU_AIR, dtype=np.float32)
    table_v = B_post + 6.0
    table = (Y2 > table_v) & (Y2 < table_v + 6.0) | ((Y2 > table_v + 30.0) & (Y2 < table_v + 33.0)) & (np.abs(X2) < 0.9 * A)
    tissue2[np.broadcast_to(table, U.shape)] = -250.0
    tissue2[torso(A, B_ant, B_post) < 1.0] = 30.0  # skin
    tissue2[torso(A - 2.0, B_ant - 2.0, B_post - 2.0) < 1.0] = HU_FAT
    tissue2[torso(A - fat, B_ant - fat, B_post - fat) < 1.0] = HU_MUSCLE
    hu = np.empty(grid.shape, dtype=np.float32)
    hu[:] = tissue2[None]
    return hu


def thoracic_cavity(p: dict[str, Any], grid: Grid, hu: np.ndarray) -> Cage:
    """The cavity inside the ribs, narrowing towards the apex, filled with mediastinal fat
    (soft tissue of the neck above the apex)."""
    A, B, H = p["A"], p["B"], p["H"]
    B_ant, B_post = B * 1.04, B * 0.96
    wall = p["fat"] + p["muscle"] + 8.0
    a_c, b_c = A - wall, (B_ant + B_post) / 2 - wall
    vc = (B_post - B_ant) / 2
    p.update(a_c=float(a_c), b_c=float(b_c), vc=float(vc))
    rmax = max(a_c, b_c) + 20.0
    cb = grid.box(np.array([-rmax * 1.05, -rmax * 1.05, -1e9]) + [0, vc, 0], np.array([rmax * 1.05, rmax * 1.05, 1e9]) + [0, vc, 0])
    assert cb is not None
    cbj, cbi = cb[1], cb[2]
    p["cb"] = cb
    Uc, Vc = p["U"][cbj, cbi], p["V"][cbj, cbi]
    hc = hu[:, cbj, cbi]  # view
    sZ1 = (-grid.z / H).astype(np.float32)  # 0 at apex, 1 at the posterior recess
    g = cage_profile(sZ1)[:, None, None]
    uu = (Uc / np.float32(a_c))[None] / g
    vv = ((Vc - np.float32(vc)) / np.float32(b_c))[None] / (np.float32(0.8) + np.float32(0.2) * g)
    uu *= uu
    vv *= vv
    cav_level = uu + vv
    uu *= vv
    uu *= np.float32(0.25)
    cav_level -= uu
    del uu, vv
    cavity = cav_level < 1.0
    cav_fill = (HU_FAT + 10.0 + 110.0 * (1.0 - smoothstep((sZ1 + 0.05) / 0.15))).astype(np.float32)[:, None, None]
    np.copyto(hc, np.broadcast_to(cav_fill, hc.shape), where=cavity)
    return Cage(box=cb, Uc=Uc, Vc=Vc, hu=hc, level=cav_level, inside=cavity)


def ribs(rng: np.random.Generator, p: dict[str, Any], grid: Grid, cage: Cage) -> None:
    """A helical band just outside the cavity, sloping down anteriorly; costal cartilage in front."""
    H, a_c, b_c, vc = p["H"], p["a_c"], p["b_c"], p["vc"]
    hc, Uc, Vc, cav_level = cage.hu, cage.Uc, cage.Vc, cage.level
    band_lim = np.float32((1.0 + 13.0 / min(a_c, b_c)) ** 2)
    band = cav_level < band_lim
    band &= ~cage.inside
    flat = np.flatnonzero(band)
    kk, rest = np.divmod(flat, hc.shape[1] * hc.shape[2])
    jj, ii = np.divmod(rest, hc.shape[2])
    psi = np.arctan2(np.abs(Uc[jj, ii]), Vc[jj, ii] - vc) / np.pi  # 0 posterior, 1 anterior
    rho = np.sqrt(cav_level.ravel()[flat])
    pitch = float(rng.uniform(22.0, 27.0))
    drop = float(rng.uniform(95.0, 125.0))
    zk = grid.z[kk]
    phase = (zk + drop * psi - float(rng.uniform(0, pitch))) / pitch
    frac = phase - np.floor(phase)
    rib_h = 9.0 / pitch
    depth = (rho - 1.0) * min(a_c, b_c)  # mm outside the cavity
    dv = (frac - rib_h / 2) / (rib_h / 2)
    du = (depth - 5.0) / 3.8
    r2 = du * du + dv * dv
    on = (r2 < 1.0) & (psi < 0.86) & (zk < 20.0) & (zk > -H - 70.0)
    cart = (r2 < 1.0) & (psi >= 0.86) & (psi < 0.95) & (zk < -20.0)  # costal cartilage
    # Cortical bone as dense as in real scans (peaks of 1000-1900 HU): with softer bone every
    # voxel over ~1000 HU in training was a device, and real ribs and spines read as one.
    rib_val = np.where(r2 > 0.45, np.float32(rng.uniform(800, 1400)), np.float32(rng.uniform(180, 300)))
    sel_on, sel_cart = flat[on], flat[cart]
    k_on, r_on = np.divmod(sel_on, hc.shape[1] * hc.shape[2])
    j_on, i_on = np.divmod(r_on, hc.shape[2])
    hc[k_on, j_on, i_on] = rib_val[on]
    k_c, r_c = np.divmod(sel_cart, hc.shape[1] * hc.shape[2])
    j_c, i_c = np.divmod(r_c, hc.shape[2])
    hc[k_c, j_c, i_c] = 110.0


def spine(rng: np.random.Generator, p: dict[str, Any], grid: Grid, hu: np.ndarray, cage: Cage) -> tuple[np.ndarray, float, float]:
    """Vertebral bodies (cortex, marrow, discs along z), canal and posterior elements, as a 2D
    cross-section over every slice. Returns the spine's footprint on the cage box (lungs
    stay off it) and the cortical and marrow densities (the sternum shares them)."""
    U, V, vc, b_c = p["U"], p["V"], p["vc"], p["b_c"]
    v_vb = vc + b_c - 14.0
    r_vb = float(rng.uniform(16.0, 21.0))
    d_vb = ((U / (r_vb * 1.1)) ** 2 + ((V - v_vb) / r_vb) ** 2)
    v_can = v_vb + r_vb + 7.0
    d_can = (U / 7.5) ** 2 + ((V - v_can) / 7.0) ** 2
    arch = ((U / 14.0) ** 2 + ((V - v_can) / 12.5) ** 2 < 1.0) & (d_can >= 1.0)
    spinous = (np.abs(U) < 4.0) & (V > v_can) & (V < v_can + 34.0)
    transverse = (np.abs(V - (v_can - 2.0) - 0.25 * np.abs(U)) < 4.0) & (np.abs(U) < 34.0) & (np.abs(U) > 8.0)
    post = arch | spinous | transverse
    vb_cortex = (d_vb < 1.0) & (d_vb >= 0.72)
    vb_marrow = d_vb < 0.72
    disc_pitch = float(rng.uniform(24.0, 29.0))
    ph = (grid.z / disc_pitch + rng.uniform(0, 1)) % 1.0
    disc = (ph < 0.2)[:, None, None]
    any_sp = (d_vb < 1.3) | post | (d_can < 1.0)
    rows, cols = np.nonzero(any_sp.any(axis=1))[0], np.nonzero(any_sp.any(axis=0))[0]
    jlo, jhi, ilo, ihi = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    ssl = (slice(None), slice(jlo, jhi), slice(ilo, ihi))
    sub = lambda m: m[jlo:jhi, ilo:ihi][None]  # noqa: E731
    cort_hu, marrow_hu = float(rng.uniform(850, 1500)), float(rng.uniform(160, 260))
    paint(hu, ssl, sub(vb_marrow) & ~disc, marrow_hu)
    paint(hu, ssl, sub(vb_cortex) & ~disc, cort_hu)
    paint(hu, ssl, sub(d_vb < 1.0) & disc, 85.0)
    paint(hu, ssl, sub(post), 0.5 * (cort_hu + marrow_hu))
    paint(hu, ssl, sub(d_can < 1.0), 20.0)  # cord + CSF
    spine2 = ((d_vb < 1.45) | (d_can < 1.6) | post)[cage.box[1], cage.box[2]]
    p.update(v_vb=float(v_vb), r_vb=r_vb)
    return spine2, cort_hu, marrow_hu


def sternum(p: dict[str, Any], grid: Grid, hu: np.ndarray, marrow_hu: float, cort_hu: float) -> None:
    """The sternum in front of the cavity, sloping posteriorly going up, wider at the manubrium."""
    H, B, b_c, vc = p["H"], p["B"], p["b_c"], p["vc"]
    c, s = p["cos"], p["sin"]
    s_lo, s_hi = -0.82 * H, -0.12 * H
    stern_v = -(b_c - vc) - 3.0
    res = grid.box(np.array([-60, -B - 20, s_lo]), np.array([60, -B * 0.2 + 10, s_hi]))
    if res is not None:
        zz, yy, xx = grid.axes(res)
        uu_ = c * xx + s * yy
        vv_ = -s * xx + c * yy
        vst = stern_v + 0.35 * (zz / H + 0.12) * 25.0  # sternum slopes posteriorly going up
        lvl = (uu_ / (16.0 + 10.0 * (zz > -0.3 * H))) ** 2 + ((vv_ - vst) / 6.0) ** 2
        paint(hu, res, lvl < 1.0, np.where(lvl < 0.45, marrow_hu, cort_hu))


def diaphragm(rng: np.random.Generator, p: dict[str, Any], cage: Cage) -> np.ndarray:
    """Two domes (right higher), lowest posteriorly: the height of the diaphragm (2D, cage box)."""
    H, a_c, b_c, vc = p["H"], p["a_c"], p["b_c"], p["vc"]
    Uc, Vc = cage.Uc, cage.Vc
    zR = -H * float(rng.uniform(0.70, 0.78))
    zL = zR - float(rng.uniform(5.0, 22.0))
    u_dc = 0.45 * a_c
    v_dc = vc - 0.1 * b_c
    dv_n = (Vc - v_dc) / b_c
    dv_n2 = dv_n * dv_n * (1.0 + 1.2 * (dv_n > 0))
    domeR = zR - 0.3 * H * (((Uc + u_dc) / (0.75 * a_c)) ** 2 + dv_n2)
    domeL = zL - 0.3 * H * (((Uc - u_dc) / (0.75 * a_c)) ** 2 + dv_n2)
    zd = np.maximum(np.maximum(domeR, domeL), -H).astype(np.float32)  # (ny_c, nx_c)
    p.update(zR=float(zR), zL=float(zL), u_dc=float(u_dc), v_dc=float(v_dc))
    return zd


def upper_abdomen(rng: np.random.Generator, p: dict[str, Any], grid: Grid, hu: np.ndarray, cage: Cage, zd: np.ndarray) -> None:
    """Below the domes: liver (reaching across anteriorly), stomach with a small air cap, spleen."""
    a_c, b_c, vc, zL = p["a_c"], p["b_c"], p["vc"], p["zL"]
    Uc, Vc, hc, cb = cage.Uc, cage.Vc, cage.hu, cage.box
    below = grid.z[:, None, None] < zd[None]
    below &= cage.inside
    liver_side = (Uc < 0.25 * a_c - 0.6 * (Vc - vc))[None]  # liver reaches across anteriorly
    enhance = ORGAN_ENHANCEMENT[p.get("phase")]  # 0 unless a contrast phase is forced (``synth.shift``)
    abd = np.where(liver_side, np.float32(HU_LIVER + rng.uniform(-6, 6) + enhance), np.float32(rng.uniform(-40, 10)))
    np.copyto(hc, abd, where=below)
    st_center = np.array([0.5 * a_c, vc - 0.1 * b_c, zL - 35.0])
    st = ellipsoid(grid, body_to_lps(p, st_center), np.array([42.0, 38.0, 40.0]))
    if st is not None:
        sl, lvl = st
        bsl = _sub_box(sl, cb)
        if bsl is not None:
            lvl = lvl[bsl[1]]
            sl = bsl[0]
            m = (lvl < 1.0) & below[_rel(sl, cb)]
            paint(hu, sl, m & (lvl >= 0.75), 45.0)
            fluid_level = body_to_lps(p, st_center)[1] - float(rng.uniform(12.0, 26.0))  # small anterior air cap (supine)
            yy = grid.axes(sl)[1]
            paint(hu, sl, m & (lvl < 0.75), np.where(yy < fluid_level, HU_AIR, 15.0))
    sp_center = np.array([0.72 * a_c, vc + 0.55 * b_c, zL - 30.0])
    spl = ellipsoid(grid, body_to_lps(p, sp_center), np.array([25.0, 45.0, 40.0]), rotation(0.6))
    if spl is not None:
        sl, lvl = spl
        bsl = _sub_box(sl, cb)
        if bsl is not None:
            lvl = lvl[bsl[1]]
            sl = bsl[0]
            paint(hu, sl, (lvl < 1.0) & below[_rel(sl, cb)], 48.0 + enhance)


def _sub_box(sl: Slices, cb: Slices) -> tuple[Slices, tuple[slice, slice, slice]] | None:
    """Intersect a box with the rib-cage box: (absolute slices, slices into the first box)."""
    out, rel = [], []
    for a, b in zip(sl, cb):
        lo = max(a.start, b.start or 0)
        hi = min(a.stop, b.stop if b.stop is not None else a.stop)
        if hi <= lo:
            return None
        out.append(slice(lo, hi))
        rel.append(slice(lo - a.start, hi - a.start))
    return tuple(out), tuple(rel)  # type: ignore[return-value]


def _rel(sl: Slices, cb: Slices) -> Slices:
    """Slices of an absolute box inside arrays that cover only the rib-cage box."""
    return tuple(slice(a.start - (b.start or 0), a.stop - (b.start or 0)) for a, b in zip(sl, cb))  # type: ignore[return-value]
