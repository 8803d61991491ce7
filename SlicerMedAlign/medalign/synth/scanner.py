"""The scanner stage, after every finding is painted: beam hardening next to undiluted
contrast, ECG leads on the skin (context, not a finding), then quantum noise and the
partial-volume blur, and the rounding to int16 HU."""

from __future__ import annotations

import numpy as np

from medalign.synth.anatomy import Anatomy
from medalign.synth.frame import anterior_skin_v
from medalign.synth.painting import PaintContext, paint_tube, streaks
from medalign.synth.shapes import blur3, ellipsoid, paint
from medalign.synth.shift import ScannerShift


def ecg_leads(c: PaintContext) -> int:
    """ECG electrodes on the anterior skin, metal snaps and lead wires through the air in
    front.  Real scans carry them and reports do not call them medical material, so they
    are anatomy-like context, not a finding (no mask bit): without them every bright
    speck outside the body was a device to the model.  Returns the number of electrodes."""
    rng, anat, g = c.rng, c.anat, c.grid
    p = anat.p
    A, B_ant = p["A"], p["B_ant"]
    W = anat.to_world
    n = int(rng.integers(2, 6))
    for _ in range(n):
        u = float(rng.uniform(-0.75, 0.75)) * A
        v_skin = anterior_skin_v(p, u)
        z = float(rng.uniform(-0.75, -0.05)) * p["H"]
        for centre, semi, val in ((W(u, v_skin - 1.0, z), np.array([6.0, 1.2, 6.0]), float(rng.uniform(-50.0, 100.0))),
                                  (W(u, v_skin - 3.0, z), np.array([2.0, 1.5, 2.0]), float(rng.uniform(1500.0, 3000.0)))):
            res = ellipsoid(g, centre, semi)
            if res is not None:
                sl, lvl = res
                paint(c.hu, sl, lvl < 1.0, val)
        lift = -B_ant - float(rng.uniform(6.0, 25.0))  # wires run in the air in front of the chest
        away = float(np.sign(u) or 1.0) * float(rng.uniform(60.0, 150.0))
        wire = [W(u, v_skin - 3.0, z), W(u, lift, z), W(u + away, lift, z + float(rng.uniform(-30.0, 30.0)))]
        paint_tube(c, wire, float(rng.uniform(0.4, 0.8)), float(rng.uniform(800.0, 2000.0)))
    return n


def finish(anat: Anatomy, rng: np.random.Generator, shift: ScannerShift | None = None) -> np.ndarray:
    """Scanner look: correlated quantum noise plus partial-volume blur, then int16 HU.

    Uniform noise is used because it is four times cheaper to draw than Gaussian noise
    and the blur (a sum of neighbours) makes it Gaussian-looking anyway; it is pre-scaled
    so its standard deviation after the blur is the drawn ``noise`` level. A ``shift``
    scales the drawn noise (same draw, so the same noise pattern) and changes the
    reconstruction kernel (``kernel_filter``).
    """
    shift = shift or ScannerShift()
    g = anat.grid
    sz = g.spacing[2]
    noise = float(rng.uniform(8.0, 28.0)) * shift.noise_factor
    anat.p["noise_hu"] = round(noise, 1)
    sig = (0.55 * min(2.0 / sz, 1.0), 0.6, 0.6)  # voxels along (k, j, i): thick slices blur less between slices
    shrink = 1.0
    for s in sig:
        if s > 0.2:
            w1 = np.exp(-0.5 / (s * s))
            w = np.array([w1, 1.0, w1]) / (1.0 + 2.0 * w1)
            shrink *= float(np.sqrt((w * w).sum()))
    hu = anat.hu
    u = np.empty_like(hu)
    rng.random(out=u, dtype=np.float32)
    u -= np.float32(0.5)
    u *= np.float32(np.sqrt(12.0) * noise / shrink)
    hu += u
    blur3(hu, sig, buf=u)
    kernel_filter(hu, shift.kernel, buf=u)
    del u
    np.clip(hu, -1024.0, 3071.0, out=hu)
    np.rint(hu, out=hu)
    return hu.astype(np.int16)


def kernel_filter(hu: np.ndarray, kernel: str, buf: np.ndarray) -> None:
    """The reconstruction kernel, in place and in-plane only (kernels act per slice):
    "sharp" adds 1.5 times the detail the 3-tap blur removes (an unsharp mask: steeper
    edges and louder fine noise), "smooth" blurs twice more (sigma about 1.4 voxels in
    all); "standard" leaves the image as it is."""
    if kernel == "smooth":
        blur3(hu, (0.0, 1.0, 1.0), buf=buf)
        blur3(hu, (0.0, 1.0, 1.0), buf=buf)
    elif kernel == "sharp":
        low = hu.copy()
        blur3(low, (0.0, 1.0, 1.0), buf=buf)
        hu -= low  # the detail
        hu *= np.float32(2.5)
        hu += low  # low + 2.5 * detail = image + 1.5 * detail
        del low


def scan(c: PaintContext, shift: ScannerShift | None = None) -> tuple[np.ndarray, int]:
    """Everything after the findings, from the context's (scanner) stream: streaks beside
    contrast inflow, ECG leads in half the scans, noise and blur (and the ``shift``'s
    noise level and kernel). Returns the int16 HU volume and the number of ECG electrodes."""
    rng, p = c.rng, c.anat.p
    if p["inflow"] is not None:  # beam hardening next to undiluted contrast
        streaks(c, p["inflow"], amp=float(rng.uniform(30.0, 120.0)))
    n_ecg = ecg_leads(c) if rng.random() < 0.5 else 0
    return finish(c.anat, rng, shift), n_ecg
