"""Scanner and protocol variants of the phantoms: a domain-shifted test set.

Zero-shot scores drift between hospitals mostly through how the scan was acquired and
reconstructed, not through the patients, so each variant changes one acquisition factor
of an otherwise identical phantom (same seed, same patient draw):

- ``noise``: three times the quantum noise (roughly a ninth of the dose);
- ``sharp`` / ``smooth``: reconstruction kernel; sharp boosts in-plane high frequencies
  (crisper edges, noisier), smooth blurs them further (soft edges, less noise);
- ``thick``: 5 mm slices, each the mean of the thin slices it covers (partial volume
  along z, as a thick reconstruction of a thin acquisition is);
- ``arterial`` / ``venous``: contrast phase, forced on: bright arteries and little organ
  enhancement, or moderately enhanced blood with enhanced liver and spleen.

No variant is the default: ``make_phantom`` without a shift is byte-identical to before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medalign.core.errors import InputError

#: Every variant name ``--shift`` accepts, with what it does (the CLI help lists these).
SHIFT_NAMES: dict[str, str] = {
    "noise": "three times the quantum noise",
    "sharp": "sharp reconstruction kernel (edge-enhancing)",
    "smooth": "smooth reconstruction kernel (extra in-plane blur)",
    "thick": "5 mm slices averaged from thin ones",
    "arterial": "contrast, arterial phase",
    "venous": "contrast, portal-venous phase",
}

NOISE_FACTOR = 3.0
THICK_SLICE_MM = 5.0


@dataclass(frozen=True)
class ScannerShift:
    """The acquisition factors a shift changes; the defaults change nothing."""

    noise_factor: float = 1.0
    kernel: str = "standard"  # "standard" | "sharp" | "smooth"
    slice_mm: float | None = None  # thick-slice reconstruction, mm
    phase: str | None = None  # None (drawn as before) | "arterial" | "venous"

    @property
    def names(self) -> list[str]:
        """The variant names this shift was made of (for manifests and meta)."""
        out = ["noise"] if self.noise_factor != 1.0 else []
        out += [self.kernel] if self.kernel != "standard" else []
        out += ["thick"] if self.slice_mm else []
        out += [self.phase] if self.phase else []
        return out

    @property
    def is_identity(self) -> bool:
        return not self.names


def parse_shift(spec: str | list[str] | tuple[str, ...] | ScannerShift | None) -> ScannerShift:
    """``"noise,sharp"`` (or a list of names) -> ``ScannerShift``; None or "" -> no shift.

    Two kernels or two phases at once are contradictory and refused in one sentence."""
    if isinstance(spec, ScannerShift):
        return spec
    if spec is None:
        return ScannerShift()
    raw = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [str(n).strip().lower() for n in raw if str(n).strip()]
    unknown = [n for n in names if n not in SHIFT_NAMES]
    if unknown:
        raise InputError(f"Unknown scanner shift {unknown[0]!r}; choose from {', '.join(SHIFT_NAMES)}.")
    kernels = [n for n in names if n in ("sharp", "smooth")]
    phases = [n for n in names if n in ("arterial", "venous")]
    if len(set(kernels)) > 1 or len(set(phases)) > 1:
        pair = kernels if len(set(kernels)) > 1 else phases
        raise InputError(f"Scanner shifts {pair[0]!r} and {pair[1]!r} cannot be combined (one scan has one of them).")
    return ScannerShift(noise_factor=NOISE_FACTOR if "noise" in names else 1.0,
                        kernel=kernels[0] if kernels else "standard",
                        slice_mm=THICK_SLICE_MM if "thick" in names else None,
                        phase=phases[0] if phases else None)


def thin_source_spacing(slice_mm: float, drawn_mm: float) -> tuple[float, int]:
    """The thin slice spacing a thick reconstruction is averaged from, and how many thin
    slices make one thick one (at least two, and no coarser than the drawn spacing)."""
    n = max(2, int(np.ceil(slice_mm / drawn_mm - 1e-6)))
    return slice_mm / n, n


def thick_slices(hu: np.ndarray, mask: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Average every ``n`` consecutive slices (axis 0) into one; the finding mask of a thick
    slice is the union of its thin slices' bits, so labels and mask still agree. The last
    slab is padded by repeating the last slice (voxels) and with no finding (mask)."""
    nz = hu.shape[0]
    pad = (-nz) % n
    if pad:
        hu = np.concatenate([hu, np.repeat(hu[-1:], pad, axis=0)])
        mask = np.concatenate([mask, np.zeros((pad, *mask.shape[1:]), dtype=mask.dtype)])
    slabs = hu.reshape(-1, n, *hu.shape[1:]).astype(np.float32).mean(axis=1)
    thick_hu = np.rint(slabs).astype(np.int16)
    thick_mask = np.bitwise_or.reduce(mask.reshape(-1, n, *mask.shape[1:]), axis=1)
    return thick_hu, thick_mask


def blood_hu(rng: np.random.Generator, phase: str) -> float:
    """Blood density of a forced phase (one draw, as the unshifted path makes): arterial
    300-420 HU, portal-venous 150-200 HU."""
    lo, hi = (300.0, 420.0) if phase == "arterial" else (150.0, 200.0)
    return float(rng.uniform(lo, hi))


#: Organ enhancement (HU added to liver and spleen) per phase.
ORGAN_ENHANCEMENT = {None: 0.0, "arterial": 10.0, "venous": 50.0}
