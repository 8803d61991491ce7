"""Normal chest anatomy for the synthetic CT phantoms (see ``medalign.synth.phantoms``).

Everything is drawn straight onto the output voxel grid with vectorised NumPy: organs
are analytic shapes (ellipsoids, capsules, superellipses) evaluated only inside their
bounding boxes, and the lung vessel trees are rasterised by splatting centre-line
points and blurring them, which gives the partial-volume look of small vessels for a
fraction of the cost of exact tubes. Coordinates are patient LPS millimetres
(x -> left, y -> posterior, z -> superior), the voxel order of a typical axial CT file;
``z = 0`` is the top of the lung apices. A "body frame" (u, v) is the LPS axial plane
rotated by the patient's small in-plane tilt and centred on the torso.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

HU_AIR = -1000.0
HU_FAT = -100.0
HU_MUSCLE = 45.0
HU_BLOOD = 40.0
HU_LUNG = -855.0
HU_LIVER = 58.0

Slices = tuple[slice, slice, slice]


def smoothstep(x: np.ndarray | float) -> np.ndarray:
    """0 -> 1 ramp with zero slope at both ends (anatomical transitions are smooth)."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


class Grid:
    """The output voxel grid: ``array[k, j, i]`` at LPS ``origin + (i*sx, j*sy, k*sz)``."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float], origin: tuple[float, float, float]):
        self.shape = tuple(int(v) for v in shape)  # (nz, ny, nx)
        self.spacing = tuple(float(v) for v in spacing)  # (sx, sy, sz)
        self.origin = tuple(float(v) for v in origin)  # LPS of voxel (0, 0, 0)
        nz, ny, nx = self.shape
        sx, sy, sz = self.spacing
        x0, y0, z0 = self.origin
        self.x = (x0 + sx * np.arange(nx)).astype(np.float32)
        self.y = (y0 + sy * np.arange(ny)).astype(np.float32)
        self.z = (z0 + sz * np.arange(nz)).astype(np.float32)

    def axes(self, sl: Slices | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (z[:,None,None], y[None,:,None], x[None,None,:]) for a box."""
        if sl is None:
            sl = (slice(None),) * 3
        return (self.z[sl[0]][:, None, None], self.y[sl[1]][None, :, None], self.x[sl[2]][None, None, :])

    def box(self, lo: np.ndarray, hi: np.ndarray) -> Slices | None:
        """Voxel slices covering the LPS box [lo, hi] (xyz), clipped; None if outside."""
        lo = np.asarray(lo, dtype=np.float64)
        hi = np.asarray(hi, dtype=np.float64)
        out = []
        for axis, n in ((2, self.shape[0]), (1, self.shape[1]), (0, self.shape[2])):
            a = int(np.floor((lo[axis] - self.origin[axis]) / self.spacing[axis]))
            b = int(np.ceil((hi[axis] - self.origin[axis]) / self.spacing[axis])) + 1
            a, b = max(a, 0), min(b, n)
            if b <= a:
                return None
            out.append(slice(a, b))
        return tuple(out)  # type: ignore[return-value]

    def index(self, p: np.ndarray) -> tuple[int, int, int]:
        """Nearest voxel (k, j, i) of an LPS point, clipped into the grid."""
        i = int(np.clip(round((p[0] - self.origin[0]) / self.spacing[0]), 0, self.shape[2] - 1))
        j = int(np.clip(round((p[1] - self.origin[1]) / self.spacing[1]), 0, self.shape[1] - 1))
        k = int(np.clip(round((p[2] - self.origin[2]) / self.spacing[2]), 0, self.shape[0] - 1))
        return k, j, i

    def contains(self, p: np.ndarray) -> bool:
        lo = np.array(self.origin)
        hi = lo + np.array(self.spacing) * (np.array(self.shape[::-1]) - 1)
        return bool(np.all(p >= lo) and np.all(p <= hi))


def capsule(
    grid: Grid, p0: np.ndarray, p1: np.ndarray, r0: float, r1: float, pad: float = 0.0
) -> tuple[Slices, np.ndarray, np.ndarray] | None:
    """Distance to a tapered segment inside its bounding box: (slices, dist, radius).

    Tubes (aorta, bronchi, catheters, leads) are chains of these; callers threshold
    ``dist`` against ``radius`` (+ wall thickness) to paint lumen and wall.
    """
    p0 = np.asarray(p0, dtype=np.float32)
    p1 = np.asarray(p1, dtype=np.float32)
    rmax = max(r0, r1) + pad + max(grid.spacing)
    sl = grid.box(np.minimum(p0, p1) - rmax, np.maximum(p0, p1) + rmax)
    if sl is None:
        return None
    z, y, x = grid.axes(sl)
    d = p1 - p0
    l2 = float(d @ d) or 1e-6
    t = ((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / l2
    np.clip(t, 0.0, 1.0, out=t)
    dx = x - (p0[0] + t * d[0])
    dy = y - (p0[1] + t * d[1])
    dz = z - (p0[2] + t * d[2])
    dist = np.sqrt(dx * dx + dy * dy + dz * dz)
    radius = r0 + t * (r1 - r0)
    return sl, dist, radius


def ellipsoid(
    grid: Grid, center: np.ndarray, semi: np.ndarray, rot: np.ndarray | None = None, scale: float = 1.0
) -> tuple[Slices, np.ndarray] | None:
    """Normalised level ``sum((R (p - c) / semi)^2)`` in the box of the ellipsoid scaled by ``scale``.

    ``level < 1`` is inside; ``level < s^2`` is the ellipsoid grown by ``s`` (shells for
    pericardial fat or effusion reuse one evaluation).
    """
    center = np.asarray(center, dtype=np.float32)
    semi = np.asarray(semi, dtype=np.float32)
    rot = np.eye(3, dtype=np.float32) if rot is None else np.asarray(rot, dtype=np.float32)
    r = float(semi.max()) * scale + max(grid.spacing)
    sl = grid.box(center - r, center + r)
    if sl is None:
        return None
    z, y, x = grid.axes(sl)
    dx, dy, dz = x - center[0], y - center[1], z - center[2]
    level = np.zeros(np.broadcast_shapes(dz.shape, dy.shape, dx.shape), dtype=np.float32)
    for a in range(3):
        q = (rot[a, 0] * dx + rot[a, 1] * dy + rot[a, 2] * dz) / semi[a]
        level += q * q
    return sl, level


def rotation(yaw: float, pitch: float = 0.0) -> np.ndarray:
    """Rows are the local axes in LPS: yaw about z (axial plane), then pitch about local y."""
    cy, sy = np.cos(yaw), np.sin(yaw)
    cp, sp = np.cos(pitch), np.sin(pitch)
    rz = np.array([[cy, sy, 0], [-sy, cy, 0], [0, 0, 1]])
    ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    return (ry @ rz).astype(np.float32)


def paint(vol: np.ndarray, sl: Slices, mask: np.ndarray, value: float | np.ndarray) -> None:
    """Set ``vol[sl]`` to ``value`` where ``mask`` (broadcast to the box)."""
    sub = vol[sl]
    np.copyto(sub, np.asarray(value, dtype=np.float32), where=np.broadcast_to(mask, sub.shape))


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


@dataclass
class Anatomy:
    """The normal phantom plus the geometry that findings need to place themselves."""

    grid: Grid
    hu: np.ndarray  # float32 [k, j, i]
    lung: np.ndarray  # int8 [k, j, i]: 0 none, 1 right lung, 2 left lung
    vessel: np.ndarray  # float32 lung-vessel occupancy in [0, 1]
    p: dict[str, Any] = field(default_factory=dict)  # scalar parameters and landmarks (LPS mm)

    def to_world(self, u: np.ndarray | float, v: np.ndarray | float, z: np.ndarray | float) -> np.ndarray:
        """Body frame (u left, v posterior, z) -> LPS."""
        c, s = self.p["cos"], self.p["sin"]
        x = self.p["cx"] + c * np.asarray(u) - s * np.asarray(v)
        y = self.p["cy"] + s * np.asarray(u) + c * np.asarray(v)
        return np.stack(np.broadcast_arrays(x, y, np.asarray(z, dtype=np.float64)), axis=-1).astype(np.float64)

    def to_body(self, p: np.ndarray) -> np.ndarray:
        """LPS -> body frame (u, v, z)."""
        p = np.asarray(p, dtype=np.float64)
        c, s = self.p["cos"], self.p["sin"]
        dx, dy = p[..., 0] - self.p["cx"], p[..., 1] - self.p["cy"]
        return np.stack([c * dx + s * dy, -s * dx + c * dy, p[..., 2]], axis=-1)

    def lobe(self, p: np.ndarray) -> str:
        """Lobe name for an LPS point (fissures are planes in the body frame)."""
        u, v, z = self.to_body(p)
        H, bc, vc = self.p["H"], self.p["b_c"], self.p["vc"]
        vn = float(np.clip((v - vc) / bc, -1.0, 1.0))  # -1 anterior, +1 posterior
        z_obl = -H * (0.36 + 0.44 * (1.0 - vn) / 2.0)
        if u < self.p["u_med"]:
            if z < z_obl:
                return "right lower lobe"
            return "right upper lobe" if z > -0.5 * H else "right middle lobe"
        if z < z_obl:
            return "left lower lobe"
        return "lingula" if (z < -0.56 * H and vn < 0.0) else "left upper lobe"


def sample_geometry(rng: np.random.Generator, spacing: tuple[float, float, float] | None) -> dict[str, Any]:
    """Patient size, pose, and scan geometry drawn for one phantom."""
    p: dict[str, Any] = {}
    p["A"] = float(rng.uniform(140.0, 185.0))  # torso half width (LR)
    p["B"] = float(rng.uniform(92.0, 125.0))  # torso half depth (AP)
    p["fat"] = float(rng.uniform(4.0, 24.0))
    p["muscle"] = float(rng.uniform(6.0, 12.0))
    p["H"] = float(rng.uniform(215.0, 270.0))  # lung height apex -> posterior recess
    p["angle"] = float(np.deg2rad(rng.uniform(-4.0, 4.0)))
    p["cos"], p["sin"] = float(np.cos(p["angle"])), float(np.sin(p["angle"]))
    if spacing is None:
        sxy = float(rng.uniform(1.2, 2.5))
        sz = float(rng.choice(SLICE_SPACINGS, p=SLICE_SPACING_P))
        # thin slices only with coarser pixels: bounds the voxel count (and time) per phantom
        sz = max(sz, min(MIN_VOXEL_MM3 / (sxy * sxy), 5.0))
        spacing = (sxy, sxy, sz)
    p["spacing"] = tuple(float(v) for v in spacing)
    return p


# Slice spacings of the random scan geometry: thin reconstructions are rarer (and cost
# proportionally more voxels), as in the CT-RATE archive, most of which is 1-5 mm.
SLICE_SPACINGS = (1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
SLICE_SPACING_P = (0.08, 0.12, 0.15, 0.2, 0.15, 0.3)
MIN_VOXEL_MM3 = 6.0


def blur3(vol: np.ndarray, sigma: tuple[float, float, float], buf: np.ndarray | None = None) -> None:
    """In-place separable 3-tap Gaussian (sigma in voxels along k, j, i).

    The scanner's partial-volume blur at the output resolution is about one voxel wide,
    so three taps suffice; working in place with one scratch buffer (``buf``, same shape
    and dtype, reusable) makes it several times cheaper than ``scipy.ndimage``.
    """
    if buf is None:
        buf = np.empty_like(vol)
    for axis, s in enumerate(sigma):
        if s <= 0.2 or vol.shape[axis] < 3:
            continue
        w1 = float(np.exp(-0.5 / (s * s)))
        w0 = 1.0 / (1.0 + 2.0 * w1)
        w1 *= w0
        a = np.moveaxis(vol, axis, 0)
        b = np.moveaxis(buf, axis, 0)
        np.add(a[:-2], a[2:], out=b[1:-1])
        np.add(a[0], a[1], out=b[0])  # edges: nearest-neighbour replication
        np.add(a[-1], a[-2], out=b[-1])
        b *= np.float32(w1)
        a *= np.float32(w0)
        a += b


def build_anatomy(rng: np.random.Generator, geom: dict[str, Any], heart_scale: float = 1.0,
                  pericardial_fluid_mm: float = 0.0, contrast: bool = False) -> Anatomy:
    """Draw a normal chest (optionally with an enlarged heart or pericardial fluid).

    ``heart_scale`` and ``pericardial_fluid_mm`` are anatomy parameters rather than
    painted findings because the lungs and mediastinum must wrap around the changed heart.
    Full-volume work is limited to the rib-cage box; the torso wall is a 2D image
    broadcast over slices.
    """
    p = dict(geom)
    sx, sy, sz = p["spacing"]
    A, B, H = p["A"], p["B"], p["H"]
    # Field of view: torso plus a margin (and the table behind), body off-centre.
    off_x, off_y = rng.uniform(-15, 15), rng.uniform(-10, 10)
    fov_x = 2 * A + rng.uniform(20, 60)
    fov_y = 2 * B + rng.uniform(40, 70)
    z_top = rng.uniform(15.0, 40.0)
    z_bot = -H - rng.uniform(25.0, 60.0)
    nx, ny = int(np.ceil(fov_x / sx)), int(np.ceil(fov_y / sy))
    nz = int(np.ceil((z_top - z_bot) / sz)) + 1
    grid = Grid((nz, ny, nx), (sx, sy, sz), (-fov_x / 2 + off_x, -fov_y / 2 + off_y - 12.0, z_bot))
    p["cx"], p["cy"] = 0.0, 0.0
    p.update(z_top=float(z_top), z_bot=float(z_bot))
    c, s = p["cos"], p["sin"]
    rbody = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float32)  # body -> LPS

    X2, Y2 = grid.x[None, :], grid.y[:, None]
    U = (c * X2 + s * Y2).astype(np.float32)  # (ny, nx) body frame
    V = (-s * X2 + c * Y2).astype(np.float32)
    p["U"], p["V"] = U, V
    zf = grid.z
    sZ1 = (-zf / H).astype(np.float32)  # 0 at apex, 1 at the posterior recess

    # ---- torso wall and table (2D, broadcast over slices) ----
    fat, mus = p["fat"], p["muscle"]
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

    # ---- thoracic cavity (inside the ribs), narrowing towards the apex ----
    wall = fat + mus + 8.0
    a_c, b_c = A - wall, (B_ant + B_post) / 2 - wall
    vc = (B_post - B_ant) / 2
    p.update(a_c=float(a_c), b_c=float(b_c), vc=float(vc))
    # box of the rib cage (+ ribs) in voxels: all later 3D work happens inside it
    rmax = max(a_c, b_c) + 20.0
    cb = grid.box(np.array([-rmax * 1.05, -rmax * 1.05, -1e9]) + [0, vc, 0], np.array([rmax * 1.05, rmax * 1.05, 1e9]) + [0, vc, 0])
    assert cb is not None
    cbj, cbi = cb[1], cb[2]
    p["cb"] = cb
    Uc, Vc = U[cbj, cbi], V[cbj, cbi]
    hc = hu[:, cbj, cbi]  # view
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
    # mediastinal fat; soft tissue of the neck above the apex
    cav_fill = (HU_FAT + 10.0 + 110.0 * (1.0 - smoothstep((sZ1 + 0.05) / 0.15))).astype(np.float32)[:, None, None]
    np.copyto(hc, np.broadcast_to(cav_fill, hc.shape), where=cavity)

    # ---- ribs: a helical band just outside the cavity, sloping down anteriorly ----
    band_lim = np.float32((1.0 + 13.0 / min(a_c, b_c)) ** 2)
    band = cav_level < band_lim
    band &= ~cavity
    flat = np.flatnonzero(band)
    kk, rest = np.divmod(flat, hc.shape[1] * hc.shape[2])
    jj, ii = np.divmod(rest, hc.shape[2])
    psi = np.arctan2(np.abs(Uc[jj, ii]), Vc[jj, ii] - vc) / np.pi  # 0 posterior, 1 anterior
    rho = np.sqrt(cav_level.ravel()[flat])
    pitch = float(rng.uniform(22.0, 27.0))
    drop = float(rng.uniform(95.0, 125.0))
    zk = zf[kk]
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
    del band, flat, kk, jj, ii, psi, rho, phase, frac, depth, dv, du, r2, on, cart, rib_val, zk

    # ---- spine (2D cross-section, discs modulate along z) ----
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
    ph = (zf / disc_pitch + rng.uniform(0, 1)) % 1.0
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
    spine2 = ((d_vb < 1.45) | (d_can < 1.6) | post)[cbj, cbi]
    p.update(v_vb=float(v_vb), r_vb=r_vb)

    # ---- sternum ----
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

    # ---- diaphragm: two domes (right higher), lowest posteriorly ----
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
    Zc = zf[:, None, None]
    below = Zc < zd[None]
    below &= cavity

    # ---- upper abdomen below the domes: liver, stomach, spleen ----
    liver_side = (Uc < 0.25 * a_c - 0.6 * (Vc - vc))[None]  # liver reaches across anteriorly
    abd = np.where(liver_side, np.float32(HU_LIVER + rng.uniform(-6, 6)), np.float32(rng.uniform(-40, 10)))
    np.copyto(hc, abd, where=below)
    st_center = np.array([0.5 * a_c, vc - 0.1 * b_c, zL - 35.0])
    st = ellipsoid(grid, _w(p, st_center), np.array([42.0, 38.0, 40.0]))
    if st is not None:
        sl, lvl = st
        bsl = _sub_box(sl, cb)
        if bsl is not None:
            lvl = lvl[bsl[1]]
            sl = bsl[0]
            m = (lvl < 1.0) & below[_rel(sl, cb)]
            paint(hu, sl, m & (lvl >= 0.75), 45.0)
            fluid_level = _w(p, st_center)[1] - float(rng.uniform(12.0, 26.0))  # small anterior air cap (supine)
            yy = grid.axes(sl)[1]
            paint(hu, sl, m & (lvl < 0.75), np.where(yy < fluid_level, HU_AIR, 15.0))
    sp_center = np.array([0.72 * a_c, vc + 0.55 * b_c, zL - 30.0])
    spl = ellipsoid(grid, _w(p, sp_center), np.array([25.0, 45.0, 40.0]), rotation(0.6))
    if spl is not None:
        sl, lvl = spl
        bsl = _sub_box(sl, cb)
        if bsl is not None:
            lvl = lvl[bsl[1]]
            sl = bsl[0]
            paint(hu, sl, (lvl < 1.0) & below[_rel(sl, cb)], 48.0)
    del below

    # ---- mediastinal landmarks (body frame) ----
    u_med = float(rng.uniform(-6.0, 6.0))
    p["u_med"] = u_med
    v_tr = v_vb - r_vb - 22.0  # trachea anterior to the spine / oesophagus
    z_car = -H * float(rng.uniform(0.34, 0.42))
    r_tr = float(rng.uniform(8.0, 10.5))
    p.update(v_tr=float(v_tr), z_car=float(z_car), r_tr=r_tr)

    # Heart: an oblique ellipsoid resting on the diaphragm, apex left-anterior-inferior.
    hs = heart_scale
    semi_h = np.array([0.44 * a_c * hs, min(0.56 * b_c * (1 + 0.3 * (hs - 1)), 0.7 * b_c), 0.37 * a_c * (1 + 0.4 * (hs - 1))])
    yaw = -np.deg2rad(rng.uniform(28.0, 45.0) - 25.0 * (hs - 1))  # big hearts lie more transversely
    pitch_h = np.deg2rad(rng.uniform(12.0, 25.0))
    rot_b = rotation(yaw, pitch_h)
    heart_b = np.array([0.12 * a_c + 0.25 * (hs - 1) * a_c, vc - 0.30 * b_c, max(zR, zL) + 0.62 * semi_h[2]])
    rot_h = rot_b @ rbody.T
    heart_c = _w(p, heart_b)
    p.update(heart_c=heart_c, heart_semi=semi_h, heart_rot=rot_h, heart_scale=hs, pericardial_fluid_mm=pericardial_fluid_mm)

    # Aorta centre line: root -> ascending -> arch (posterior-left) -> descending -> abdomen.
    r_asc = float(rng.uniform(13.0, 17.0))
    r_desc = r_asc * float(rng.uniform(0.72, 0.82))
    root = np.array([heart_b[0] - 0.25 * semi_h[0], heart_b[1] + 0.15 * semi_h[1], heart_b[2] + 0.45 * semi_h[2]])
    asc_top = np.array([root[0] - 14.0, root[1] - 6.0, -0.26 * H])
    desc_top = np.array([22.0 + u_med, v_vb - r_vb - 4.0, -0.26 * H])
    arch_h = float(rng.uniform(18.0, 30.0))
    pts = [root, root + (asc_top - root) * 0.5, asc_top]
    for t in np.linspace(0.0, 1.0, 9)[1:-1]:
        q = asc_top + (desc_top - asc_top) * t
        q = q + np.array([0.0, 0.0, arch_h * np.sin(np.pi * t)])
        pts.append(q)
    pts += [desc_top, np.array([desc_top[0] - 4.0, desc_top[1], -0.6 * H]), np.array([desc_top[0] - 10.0, desc_top[1] + 2.0, z_bot - 20.0])]
    aorta_b = np.array(pts)
    n_a = len(aorta_b)
    i_arch = 3
    radii = np.concatenate([np.full(i_arch, r_asc), np.linspace(r_asc, r_desc, n_a - i_arch)])
    p["aorta_pts"] = _w(p, aorta_b)
    p["aorta_r"] = radii
    p["contrast"] = contrast
    blood = float(rng.uniform(180, 320)) if contrast else HU_BLOOD + float(rng.uniform(-5, 8))
    p["blood_hu"] = blood

    # Pulmonary trunk, arteries, SVC, supra-aortic branches, oesophagus.
    pa_start = np.array([heart_b[0] + 0.05 * semi_h[0], heart_b[1] - 0.35 * semi_h[1], heart_b[2] + 0.35 * semi_h[2]])
    pa_bif = np.array([u_med + 8.0, v_tr + 5.0, z_car - 18.0])
    hil_z = z_car - float(rng.uniform(22.0, 32.0))
    hilumR = np.array([u_med - 0.2 * a_c - 12.0, v_tr + 8.0, hil_z])
    hilumL = np.array([u_med + 0.2 * a_c + 16.0, v_tr + 10.0, hil_z + 4.0])
    r_pa = float(rng.uniform(11.0, 14.0))
    svc_b = np.array([root[0] - r_asc - 12.0, root[1] - 2.0])
    tubes: list[tuple[np.ndarray, np.ndarray, float, float, float]] = []  # p0, p1, r0, r1, hu
    tubes.append((_w(p, pa_start), _w(p, pa_bif), r_pa, r_pa, blood))
    tubes.append((_w(p, pa_bif), _w(p, hilumR), r_pa * 0.8, r_pa * 0.7, blood))
    tubes.append((_w(p, pa_bif), _w(p, hilumL), r_pa * 0.8, r_pa * 0.7, blood))
    svc_lo = np.array([svc_b[0], svc_b[1], heart_b[2] + 0.5 * semi_h[2]])
    svc_hi = np.array([svc_b[0] - 4, svc_b[1], z_top + 10])
    p["inflow"] = None
    if contrast and rng.random() < 0.5:
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
    es_mid = np.array([u_med + 8.0, v_vb - r_vb - 9.0, z_car - 40.0])
    es_bot = np.array([0.25 * a_c, vc - 0.05 * b_c, zL - 20.0])
    tubes.append((_w(p, es_top), _w(p, es_mid), 7.0, 7.0, 38.0))
    tubes.append((_w(p, es_mid), _w(p, es_bot), 7.0, 8.0, 38.0))
    p.update(hilumR=_w(p, hilumR), hilumL=_w(p, hilumL), es_pts=_w(p, np.array([es_top, es_mid, es_bot])),
             pa_bif=_w(p, pa_bif), svc=_w(p, np.array([svc_b[0], svc_b[1], -0.3 * H])))

    # ---- lungs: cavity above the diaphragm, below the apical domes, minus mediastinum ----
    apex_dome = -0.22 * H * (((np.abs(Uc - u_med) - 0.5 * a_c) / (0.55 * a_c)) ** 2 + ((Vc - vc) / (0.9 * b_c)) ** 2)
    w_med = (14.0 + 10.0 * smoothstep(sZ1 / 0.4)).astype(np.float32)[:, None, None]
    w_ant = (5.0 + 5.0 * smoothstep((sZ1 - 0.1) / 0.3)).astype(np.float32)[:, None, None]
    dist_med = np.abs(Uc - u_med)[None]
    ant = ((Vc - v_tr) < -r_tr)[None]
    lung_m = cavity
    lung_m &= Zc > zd[None]
    lung_m &= Zc < apex_dome[None].astype(np.float32)
    lung_m &= ~(np.where(ant, dist_med < w_ant, dist_med < w_med))
    lung_m &= ~spine2[None]
    del cav_level
    # carve out the heart with a fat/pericardial margin and every mediastinal tube
    peri = 1.0 + (pericardial_fluid_mm + 5.0) / float(semi_h.min())
    hres = heart_level(p, grid, scale=peri)
    lung_full = np.zeros(grid.shape, dtype=bool)
    lung_full[:, cbj, cbi] = lung_m
    del lung_m
    if hres is not None:
        sl, lvl = hres
        lung_full[sl] &= ~(lvl < peri ** 2)
    aorta_caps = []
    P = p["aorta_pts"]
    for a in range(n_a - 1):
        cap = capsule(grid, P[a], P[a + 1], radii[a], radii[a + 1], pad=4.0)
        if cap is not None:
            aorta_caps.append(cap)
            sl, dist, rad = cap
            lung_full[sl] &= ~(dist < rad + 4.0)
    tube_caps = []
    for (q0, q1, r0, r1, val) in tubes:
        cap = capsule(grid, q0, q1, r0, r1, pad=4.0)
        if cap is not None:
            tube_caps.append((cap, val))
            sl, dist, rad = cap
            lung_full[sl] &= ~(dist < rad + 3.0)
    # trachea and main bronchi
    carina = _w(p, np.array([u_med, v_tr, z_car]))
    top = _w(p, np.array([u_med - 2.0, v_tr - 4.0, z_top + 10.0]))
    bR = _w(p, hilumR + np.array([8.0, 6.0, 10.0]))
    bL = _w(p, hilumL + np.array([-8.0, 6.0, 10.0]))
    r_b = r_tr * 0.68
    airway_caps = []
    for q0, q1, r0, r1 in ((top, carina, r_tr, r_tr * 0.95), (carina, bR, r_b * 1.05, r_b * 0.9), (carina, bL, r_b, r_b * 0.85)):
        cap = capsule(grid, q0, q1, r0, r1, pad=4.0)
        if cap is not None:
            airway_caps.append((cap, 2.0))
            sl, dist, rad = cap
            lung_full[sl] &= ~(dist < rad + 2.5)
    p.update(carina=carina, bronchusR=bR, bronchusL=bL)

    lung = lung_full.view(np.int8).copy()  # 1 = right lung
    lc = lung[:, cbj, cbi]
    lc += (lc & ((Uc - u_med) > 0)[None].view(np.int8))  # 2 = left lung
    lungc_bool = lung_full[:, cbj, cbi]

    # lung parenchyma: gravity gradient (posterior denser) + smooth separable texture
    grad = (30.0 * smoothstep(((Vc - vc) / b_c + 0.3) / 1.3)).astype(np.float32)
    base = np.float32(HU_LUNG + rng.uniform(-25, 25))
    t2a = _smooth2d(rng, Uc.shape, (sy, sx), 18.0, 14.0)
    t2b = _smooth2d(rng, Uc.shape, (sy, sx), 10.0, 10.0)
    za = np.cos(2 * np.pi * zf / rng.uniform(50, 110) + rng.uniform(0, 6.3)).astype(np.float32)[:, None, None]
    zb = np.cos(2 * np.pi * zf / rng.uniform(25, 45) + rng.uniform(0, 6.3)).astype(np.float32)[:, None, None]
    lung_val = t2a[None] * za
    lung_val += t2b[None] * zb
    lung_val += (grad + base)[None]
    np.copyto(hc, lung_val, where=lungc_bool)
    del lung_val
    p["lung_hu"] = float(HU_LUNG)

    # ---- heart + pericardium ----
    if hres is not None:
        sl, lvl = hres
        fat_shell = lvl < (peri - 1.0 / float(semi_h.min()) * 1.0) ** 2
        paint(hu, sl, fat_shell, HU_FAT + 10.0)
        if pericardial_fluid_mm > 0:
            fl = 1.0 + pericardial_fluid_mm / float(semi_h.min())
            paint(hu, sl, lvl < fl ** 2, float(rng.uniform(5.0, 20.0)))
        paint(hu, sl, lvl < 1.0, HU_MUSCLE + 5.0 if contrast else blood + 3.0)
        if contrast:
            # chambers: ventricles either side of the septum, atria at the base
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
            del q

    # ---- mediastinal vessels, oesophagus, airways ----
    for sl, dist, rad in aorta_caps:
        paint(hu, sl, dist < rad + 1.5, 45.0)
    for sl, dist, rad in aorta_caps:
        paint(hu, sl, dist < rad, blood)
    for (sl, dist, rad), val in tube_caps:
        paint(hu, sl, dist < rad, val)
    for (sl, dist, _rad), _ in tube_caps[-2:]:  # a little air in the oesophageal lumen
        paint(hu, sl, dist < 1.6, -600.0)
    for (sl, dist, rad), wall_ in airway_caps:
        paint(hu, sl, dist < rad + wall_, 50.0)
    for (sl, dist, rad), _ in airway_caps:
        paint(hu, sl, dist < rad, -990.0)

    # ---- lung vessel trees (arteries from the hilum, veins to the left atrium) and bronchi ----
    vessel = np.zeros(grid.shape, dtype=np.float32)
    la = _w(p, heart_b + np.array([0.0, 0.45 * semi_h[1], 0.25 * semi_h[2]]))
    trees = []
    for side, hil, bro in ((1, p["hilumR"], bR), (2, p["hilumL"], bL)):
        pts = _sample_lung_points(rng, grid, lung, side, cb, 1400)
        if len(pts) < 30:
            continue
        art = _grow_tree(rng, hil, pts, r0=r_pa * 0.62, depth=8)
        vein_root = la + np.array([-25.0 if side == 1 else 25.0, 0.0, 0.0]) @ rbody.T
        veins = _grow_tree(rng, vein_root, pts[rng.permutation(len(pts))[: len(pts) // 2]], r0=r_pa * 0.5, depth=7)
        trees.append((side, art, veins, bro))
    p["trees"] = trees
    vbox = _splat_vessels(rng, grid, vessel, [t[1] for t in trees] + [t[2] for t in trees])
    if vbox is not None:
        vs = vessel[vbox]
        vs *= lung[vbox] > 0
        hv = hu[vbox]
        vessel_hu = np.float32(blood if contrast else HU_BLOOD)
        hv += vs * (vessel_hu - hv)

    # segmental bronchi alongside the first arterial generations (thin walls, air lumen)
    bronchi = []
    for _side, art, _veins, bro in trees:
        bronchi += bronchi_along(art, max_gen=4, start=bro)
    p["bronchi"] = bronchi
    draw_bronchi(grid, hu, bronchi, lung, wall_mm=1.0, lumen_scale=1.0)

    p["zd"] = zd
    return Anatomy(grid=grid, hu=hu, lung=lung, vessel=vessel, p=p)


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


def _smooth2d(rng: np.random.Generator, shape: tuple[int, int], spacing: tuple[float, float], sigma_mm: float, amp: float) -> np.ndarray:
    """Smooth 2D random field (unit std scaled to ``amp``): cheap lung texture component."""
    f = rng.standard_normal(shape).astype(np.float32)
    ndimage.gaussian_filter(f, sigma=(sigma_mm / spacing[0], sigma_mm / spacing[1]), output=f, mode="wrap")
    sd = float(f.std()) or 1.0
    return f * np.float32(amp / sd)


def _sample_lung_points(rng: np.random.Generator, grid: Grid, lung: np.ndarray, side: int, cb: Slices, n: int) -> np.ndarray:
    """Up to ``n`` uniform random points of one lung (rejection sampling in the rib-cage box)."""
    out = []
    got = 0
    for _ in range(6):
        m = 8 * n
        k = rng.integers(0, grid.shape[0], size=m)
        j = rng.integers(cb[1].start, cb[1].stop, size=m)
        i = rng.integers(cb[2].start, cb[2].stop, size=m)
        ok = lung[k, j, i] == side
        if ok.any():
            pts = np.stack([grid.x[i[ok]], grid.y[j[ok]], grid.z[k[ok]]], axis=1).astype(np.float64)
            out.append(pts)
            got += len(pts)
        if got >= n:
            break
    if not out:
        return np.zeros((0, 3))
    pts = np.concatenate(out)[:n]
    return pts + rng.uniform(-0.5, 0.5, pts.shape) * np.array(grid.spacing)


def _w(p: dict[str, Any], b: np.ndarray) -> np.ndarray:
    """Body frame -> LPS for points (N, 3) or (3,)."""
    b = np.asarray(b, dtype=np.float64)
    c, s = p["cos"], p["sin"]
    x = p["cx"] + c * b[..., 0] - s * b[..., 1]
    y = p["cy"] + s * b[..., 0] + c * b[..., 1]
    return np.stack([x, y, b[..., 2]], axis=-1)


@dataclass
class Branch:
    p0: np.ndarray
    p1: np.ndarray
    r0: float
    r1: float
    gen: int
    path: int  # binary path id from the root: lets findings select a sub-tree


def _grow_tree(rng: np.random.Generator, root: np.ndarray, pts: np.ndarray, r0: float, depth: int) -> list[Branch]:
    """Space-filling branching tree: each branch heads for the centroid of its share of
    lung points, which are split in two across their longest direction (Murray-like
    taper, r_child ~ 0.79 r). Leaves sprout short twigs so the periphery is not bare."""
    out: list[Branch] = []
    stack = [(np.asarray(root, dtype=np.float64), pts, r0, 0, 1)]
    leaves = []
    while stack:
        start, P, r, gen, path = stack.pop()
        cen = P.mean(axis=0)
        if gen >= depth or len(P) < 4:
            Q = P - start
            far = P[int(np.argmax(np.einsum("ij,ij->i", Q, Q)))]
            end = cen + 0.6 * (far - cen)
            out.append(Branch(start, end, r, max(r * 0.65, 0.6), gen, path))
            leaves.append((start, end, r, gen, path))
            continue
        frac = 0.55 if gen == 0 else float(rng.uniform(0.35, 0.6))
        end = start + (cen - start) * frac
        out.append(Branch(start, end, r, r * 0.86, gen, path))
        Q = P - cen
        axis = Q[int(np.argmax(np.einsum("ij,ij->i", Q, Q)))]
        proj = Q @ axis
        left = proj < float(rng.normal(0, 0.15)) * float(np.abs(proj).mean())
        if left.all() or not left.any():
            left = proj < np.median(proj)
        rc = r * 0.79
        for sub, bit in ((P[left], 0), (P[~left], 1)):
            if len(sub) >= 1:
                stack.append((end, sub, rc * float(rng.uniform(0.9, 1.08)), gen + 1, path * 2 + bit))
    # twigs: 2 short side branches from the middle of each leaf branch (vectorised)
    if leaves:
        S = np.array([l[0] for l in leaves])
        E = np.array([l[1] for l in leaves])
        R = np.array([l[2] for l in leaves])
        for _ in range(2):
            t = rng.uniform(0.3, 0.9, size=(len(S), 1))
            base = S + t * (E - S)
            d = (E - S)
            d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-9
            jit = rng.normal(size=d.shape)
            jit -= (jit * d).sum(1, keepdims=True) * d
            jit /= np.linalg.norm(jit, axis=1, keepdims=True) + 1e-9
            tip = base + (0.6 * d + jit) * rng.uniform(8.0, 18.0, size=(len(S), 1))
            for a in range(len(S)):
                out.append(Branch(base[a], tip[a], max(R[a] * 0.5, 0.6), 0.5, leaves[a][3] + 1, leaves[a][4] * 2))
    return out


def _splat_vessels(rng: np.random.Generator, grid: Grid, out: np.ndarray, trees: list[list[Branch]]) -> Slices | None:
    """Rasterise vessel trees as partial-volume tubes: splat centre-line points weighted
    by their cross-section, then blur per radius class (sigma ~ 0.55 r). Returns the box."""
    if not trees:
        return None
    step = 0.5 * min(grid.spacing)
    branches = [b for tree in trees for b in tree]
    P0 = np.array([b.p0 for b in branches])
    P1 = np.array([b.p1 for b in branches])
    R0 = np.array([b.r0 for b in branches])
    R1 = np.array([b.r1 for b in branches])
    L = np.linalg.norm(P1 - P0, axis=1)
    n = np.maximum(np.ceil(L / step).astype(np.int64), 1)
    seg = np.repeat(np.arange(len(branches)), n)
    start = np.cumsum(n) - n
    t = (np.arange(seg.size) - start[seg] + 0.5) / n[seg]
    P = P0[seg] + t[:, None] * (P1 - P0)[seg]
    R = R0[seg] + t * (R1 - R0)[seg]
    seglen = (L / n)[seg]
    sx, sy, sz = grid.spacing
    idx = np.round((P - np.array(grid.origin)) / np.array(grid.spacing)).astype(np.int64)
    nz, ny, nx = grid.shape
    ok = (idx[:, 0] >= 0) & (idx[:, 0] < nx) & (idx[:, 1] >= 0) & (idx[:, 1] < ny) & (idx[:, 2] >= 0) & (idx[:, 2] < nz)
    idx, R, seglen = idx[ok], R[ok], seglen[ok]
    if len(R) == 0:
        return None
    lo = np.maximum(idx.min(0) - 6, 0)
    hi = np.minimum(idx.max(0) + 7, [nx, ny, nz])
    bshape = (int(hi[2] - lo[2]), int(hi[1] - lo[1]), int(hi[0] - lo[0]))
    flat = ((idx[:, 2] - lo[2]) * bshape[1] + (idx[:, 1] - lo[1])) * bshape[2] + (idx[:, 0] - lo[0])
    # thin vessels: splat the cross-section and blur once (partial volume); thick
    # vessels (few, near the hilum): exact soft-edged capsules in their own small boxes
    thin = R < 2.2
    w = np.pi * R[thin] * R[thin] * seglen[thin] / (sx * sy * sz)
    acc = np.bincount(flat[thin], weights=w, minlength=int(np.prod(bshape))).astype(np.float32).reshape(bshape)
    sig = 0.55 * 1.5
    blur3(acc, (sig / sz, sig / sy, sig / sx))
    np.clip(acc, 0.0, 1.0, out=acc)
    box = (slice(int(lo[2]), int(hi[2])), slice(int(lo[1]), int(hi[1])), slice(int(lo[0]), int(hi[0])))
    out[box] = acc
    h = float(np.mean(grid.spacing[:2]))
    for b in branches:
        if max(b.r0, b.r1) < 2.2:
            continue
        cap = capsule(grid, b.p0, b.p1, b.r0, b.r1)
        if cap is None:
            continue
        sl, dist, rad = cap
        occ = (rad - dist) / np.float32(h) + np.float32(0.5)
        np.clip(occ, 0.0, 1.0, out=occ)
        np.maximum(out[sl], occ, out=out[sl])
    return box


def bronchi_along(art: list[Branch], max_gen: int, lumen_factor: float = 0.85, start: np.ndarray | None = None) -> list[Branch]:
    """Bronchi accompany the arteries: the same branches shifted sideways by both radii,
    lumens ``lumen_factor`` times the artery (wider for bronchiectasis).  ``start`` joins
    the first generation to a main bronchus."""
    out = []
    for b in art:
        if b.gen > max_gen:
            continue
        n = np.cross(b.p1 - b.p0, np.array([0.0, 0.0, 1.0]))
        norm = np.linalg.norm(n)
        n = n / norm if norm > 1e-6 else np.array([1.0, 0.0, 0.0])
        rb0, rb1 = max(b.r0 * lumen_factor, 1.0), max(b.r1 * lumen_factor, 0.8)
        p0 = b.p0 + n * (b.r0 + rb0 + 1.0)
        if b.gen == 0 and start is not None:
            p0 = np.asarray(start, dtype=np.float64)
        out.append(Branch(p0, b.p1 + n * (b.r1 + rb1 + 1.0), rb0, rb1, b.gen, b.path))
    return out


def draw_bronchi(grid: Grid, hu: np.ndarray, bronchi: list[Branch], lung: np.ndarray, wall_mm: float,
                 lumen_scale: float, mask: np.ndarray | None = None, wall_hu: float = 40.0) -> None:
    """Paint airway walls then air lumens (two passes so a wall never covers a lumen).

    With ``mask`` (bool, full grid) the painted wall+lumen voxels are also recorded.
    """
    caps = []
    for b in bronchi:
        cap = capsule(grid, b.p0, b.p1, b.r0 * lumen_scale, b.r1 * lumen_scale, pad=wall_mm + 1.0)
        if cap is not None:
            caps.append(cap)
    for sl, dist, rad in caps:
        m = (dist < rad + wall_mm) & (lung[sl] > 0)
        # thin walls are partial-volumed at coarse voxels: blend rather than overwrite
        paint(hu, sl, m, wall_hu)
        if mask is not None:
            mask[sl] |= m
    for sl, dist, rad in caps:
        m = (dist < rad) & (lung[sl] > 0)
        paint(hu, sl, m, -950.0)
