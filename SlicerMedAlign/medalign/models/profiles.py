"""Preprocessing profiles: how each model family wants a CT presented to it.

A profile is plain data; ``medalign.inference.preprocess.prepare`` turns a ``Volume`` into the
model's input tensor with it and remembers the model-grid -> RAS mapping.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PreprocessProfile:
    """One model family's input convention.

    Axes ``x, y, z`` are the model grid's axes after reorientation to ``axcodes``
    (MONAI/nibabel codes: "LPS" means x points Left, y Posterior, z Superior, which
    is the voxel order of a typical axial CT file). The tensor handed to the model is
    ``(B, 1, X, Y, Z)``.
    """

    name: str
    spacing: tuple[float, float, float]  # mm along x, y, z of the model grid
    size: tuple[int, int, int]  # X, Y, Z voxels after centre crop/pad
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    out_range: tuple[float, float] = (-1.0, 1.0)  # HU window maps linearly onto this
    pad_hu: float = -1024.0  # value (in HU) of voxels added by padding
    # True: pad with the input's own minimum HU instead of pad_hu (COLIPRI's torchio
    # ``padding_mode="minimum"``: a scan whose darkest voxel is -900 HU is padded with -900).
    pad_with_minimum: bool = False
    # How the model grid is placed and its edges sampled: "monai" (Spacing + symmetric
    # ResizeWithPadOrCrop, samples past the edge blend with the pad value) or "torchio"
    # (COLIPRI's Resample + CropOrPad: grid centred on the input, edge-clamped linear
    # interpolation, integer CTs truncated to integer HU; see inference/centred_resample.py).
    grid: str = "monai"
    mean: float | None = None  # optional normalisation after scaling: (x - mean) / std
    std: float | None = None
    axcodes: str = "LPS"
    # Gaussian pre-filter when downsampling, so a 0.7 mm scan and a 2.5 mm scan look alike
    # on a coarse grid. Off for the published families: their recipes have none.
    antialias: bool = False
    # Extra input channels after the windowed HU channel, each ("mean" | "max" | "min", lo_hu,
    # hi_hu), windowed to lo..hi.  "mean" is channel 0 under another window (a lung window
    # makes a 100 HU density change four times more salient); "max"/"min" pass the HU
    # through a running max (min) over one target voxel's footprint before resampling, so
    # a 2 mm calcification or a metal clip keeps its true HU on a 4 mm grid.
    channels: tuple[tuple[str, float, float], ...] = ()
    # False: resample and crop/pad fused into one resample (padded voxels next to the scan
    # blend with it). True: MONAI's Spacing (border padding) first, then a separate
    # constant pad, so every padded voxel is exactly pad_hu (Merlin's SpatialPadd).
    pad_after_resample: bool = False

    @property
    def n_channels(self) -> int:
        return 1 + len(self.channels)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessProfile:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        if "channels" in fields:
            fields["channels"] = tuple((str(c[0]), float(c[1]), float(c[2])) for c in fields["channels"])
        return cls(**fields)


# The demo model: coarse enough to train on a 2-core CPU, fine enough for 1 cm lesions.
# Extra channels: a lung window (emphysema, mosaic attenuation, ground glass) and a running
# max over 150..2000 HU (calcifications, metal).
DEMO = PreprocessProfile(
    name="medalign-demo-2", spacing=(4.0, 4.0, 5.0), size=(96, 96, 64), antialias=True,
    channels=(("mean", -1000.0, -500.0), ("max", 150.0, 2000.0)),
)

# BrgSA (public code): 1.5 x 1.5 x 3 mm, 256 x 256 x 128, pad -1024, clamp [-1000, 1000],
# scale to [-1, 1], then normalise with mean 0.4978, std 0.2449.
BRGSA = PreprocessProfile(
    name="brgsa", spacing=(1.5, 1.5, 3.0), size=(256, 256, 128), pad_hu=-1024.0, mean=0.4978, std=0.2449
)

# CT-CLIP (public code): clip [-1000, 1000], 0.75 x 0.75 x 1.5 mm, divide by 1000,
# centre crop/pad to 480 x 480 x 240 with -1 (i.e. -1000 HU).
CTCLIP = PreprocessProfile(name="ct-clip", spacing=(0.75, 0.75, 1.5), size=(480, 480, 240), pad_hu=-1000.0)

# COLIPRI (its processor config, torchio): to RAS, linear resample to 2 mm without
# antialiasing, clamp [-1000, 1000], rescale to [-1, 1], crop/pad to 192³ with the minimum.
COLIPRI = PreprocessProfile(
    name="colipri", spacing=(2.0, 2.0, 2.0), size=(192, 192, 192), pad_with_minimum=True, axcodes="RAS",
    grid="torchio",
)

# Merlin (merlin-vlm, merlin/data/monai_transforms.py): RAS, 1.5 x 1.5 x 3 mm bilinear,
# window [-1000, 1000] -> [0, 1] with clipping, then pad with 0 (= -1000 HU) and centre crop
# to 224 x 224 x 160.
MERLIN = PreprocessProfile(
    name="merlin", spacing=(1.5, 1.5, 3.0), size=(224, 224, 160), out_range=(0.0, 1.0), pad_hu=-1000.0, axcodes="RAS",
    pad_after_resample=True,
)

PROFILES = {p.name: p for p in (DEMO, BRGSA, CTCLIP, COLIPRI, MERLIN)}
