"""Normal chest anatomy for the synthetic CT phantoms (see ``medalign.synth.phantoms``).

Everything is drawn straight onto the output voxel grid with vectorised NumPy: organs
are analytic shapes (ellipsoids, capsules, superellipses, ``synth.shapes``) evaluated
only inside their bounding boxes. ``build_anatomy`` runs the organ systems in a fixed
order, which with their random draws is what a seed means: the chest wall, ribs, spine
and upper abdomen (``synth.chest_wall``), the mediastinum's geometry
(``synth.mediastinum``), the lungs carved around it (``synth.lungs``), the heart and
mediastinal tubes painted over them, and the lung vessel trees (``synth.vessel_trees``).
Coordinates and the body frame: ``synth.frame``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medalign.synth import chest_wall, lungs, mediastinum, shift
from medalign.synth.shapes import Grid


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


def build_anatomy(rng: np.random.Generator, geom: dict[str, Any], heart_scale: float = 1.0,
                  pericardial_fluid_mm: float = 0.0, contrast: bool = False) -> Anatomy:
    """Draw a normal chest (optionally with an enlarged heart or pericardial fluid).

    ``heart_scale`` and ``pericardial_fluid_mm`` are anatomy parameters rather than
    painted findings because the lungs and mediastinum must wrap around the changed heart.
    Full-volume work is limited to the rib-cage box; the torso wall is a 2D image
    broadcast over slices.
    """
    p = dict(geom)
    grid = _field_of_view(rng, p)
    hu = chest_wall.torso_wall(p, grid)
    cage = chest_wall.thoracic_cavity(p, grid, hu)
    chest_wall.ribs(rng, p, grid, cage)
    cage.level = None  # a float32 volume of the cage box that only the ribs need
    spine2, cort_hu, marrow_hu = chest_wall.spine(rng, p, grid, hu, cage)
    chest_wall.sternum(p, grid, hu, marrow_hu, cort_hu)
    zd = chest_wall.diaphragm(rng, p, cage)
    chest_wall.upper_abdomen(rng, p, grid, hu, cage, zd)

    mediastinum.landmarks(rng, p)
    heart_b = mediastinum.heart_geometry(rng, p, heart_scale, pericardial_fluid_mm)
    aorta_b = mediastinum.aorta(rng, p, heart_b)
    p["contrast"] = contrast
    phase = p.get("phase")  # a forced contrast phase (``synth.shift``), else drawn as always
    p["blood_hu"] = shift.blood_hu(rng, phase) if phase else mediastinum.blood_hu(rng, contrast)
    tubes, hilum_r, hilum_l = mediastinum.great_vessels(rng, p, heart_b, aorta_b)
    caps = mediastinum.mediastinal_tubes(p, grid, tubes, hilum_r, hilum_l)

    lung_full, lung, hres, peri = lungs.lung_mask(p, grid, cage, zd, spine2, caps)
    lungs.parenchyma(rng, p, grid, cage, lung_full)
    del lung_full, cage
    mediastinum.paint_heart(rng, p, grid, hu, hres, peri)
    mediastinum.paint_tubes(hu, caps, p["blood_hu"])
    vessel = lungs.vessels_and_bronchi(rng, p, grid, hu, lung, heart_b)
    p["zd"] = zd
    return Anatomy(grid=grid, hu=hu, lung=lung, vessel=vessel, p=p)


def _field_of_view(rng: np.random.Generator, p: dict[str, Any]) -> Grid:
    """The scan's voxel grid: torso plus a margin (and the table behind), body off-centre;
    also the body frame (u, v) of every in-plane voxel (``p["U"]``, ``p["V"]``)."""
    sx, sy, sz = p["spacing"]
    A, B, H = p["A"], p["B"], p["H"]
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
    X2, Y2 = grid.x[None, :], grid.y[:, None]
    p["U"] = (c * X2 + s * Y2).astype(np.float32)  # (ny, nx) body frame
    p["V"] = (-s * X2 + c * Y2).astype(np.float32)
    return grid
