"""Synthetic chest-CT phantoms with ground-truth finding masks, labels and reports.

They are the training and evaluation data of the embedded demo model, which must learn
to recognise *and localise* CT-RATE findings from images plus report text, so every
phantom carries: an int16 HU volume in RAS (``Volume``), an int32 bitmask whose bit
``f`` marks finding ``CT_RATE_FINDINGS[f]``, 0/1 labels that agree exactly with the
mask, and a free-text report whose locations and sizes come from the actual lesions.

Generation is deterministic per seed (bit-identical arrays) and vectorised so a
phantom at default settings takes a fraction of a second on one CPU core. The steps:
the normal anatomy (``synth.anatomy``), the findings, each painted by its module in
``synth.findings`` (``PaintContext`` in ``synth.painting``), the scanner's look
(``synth.scanner``) and the report (``synth.report``). This module is the synth layer's
public entry: ``make_phantom`` and ``write_dataset``.
"""

from __future__ import annotations

import csv
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medalign.core.atomic import atomic_output
from medalign.core.atomic import write_text as _write_text
from medalign.core.errors import InputError, MedAlignError
from medalign.core.parallel import ordered_map
from medalign.core.volume import Volume
from medalign.knowledge.findings import CT_RATE_FINDINGS
from medalign.synth.anatomy import Anatomy, build_anatomy, sample_geometry
from medalign.synth.findings import PAINTERS
from medalign.synth.findings.heart import draw_heart, mark_heart
from medalign.synth.findings.lymph_nodes import paint_normal_nodes
from medalign.synth.painting import BIT, PaintContext
from medalign.synth.report import make_report
from medalign.synth.scanner import scan
from medalign.synth.shapes import Grid
from medalign.synth.shift import ScannerShift, parse_shift, thick_slices, thin_source_spacing

GENERATOR_VERSION = "1.3"  # 1.1: dense bone, contrast inflow, ECG leads, emphysema by lung fraction; 1.2: nodes in fat;
# 1.3: one random stream per painter and one for the scanner stage (counterfactual twins)

#: Every CT-RATE finding can be inserted (all 18, in CT-RATE order).
PHANTOM_FINDINGS: list[str] = list(CT_RATE_FINDINGS)


@dataclass
class Phantom:
    """One synthetic CT with its ground truth (see module docstring)."""

    volume: Volume
    mask: np.ndarray
    labels: dict[str, int]
    report: str
    meta: dict[str, Any] = field(default_factory=dict)


def case_seed(seed: int, index: int) -> int:
    """Per-case seed from (dataset seed, index): any case can be regenerated alone."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]).generate_state(1, dtype=np.uint32)[0])


def _check_labels(labels: dict[str, int] | None) -> dict[str, int] | None:
    """Forced labels as {CT-RATE name: 0/1}; an unknown name or a value other than 0/1 is
    an ``InputError`` sentence."""
    if labels is None:
        return None
    unknown = [k for k in labels if k not in CT_RATE_FINDINGS]
    if unknown:
        raise InputError(f"Unknown finding {unknown[0]!r}; phantom labels must be CT-RATE names such as 'Lung nodule'.")
    bad = [k for k, v in labels.items() if int(v) not in (0, 1)]
    if bad:
        raise InputError(f"Label of {bad[0]!r} must be 0 or 1.")
    return {k: int(v) for k, v in labels.items()}


SAMPLE_SEED = 20261123
SAMPLE_FINDINGS = ("Lung nodule", "Pleural effusion", "Cardiomegaly")


def sample_chest_ct():
    """The bundled sample CT: one fixed phantom holding ``SAMPLE_FINDINGS`` and no other
    CT-RATE finding, so ``medalign screen --sample`` and the web viewer's "Sample CT"
    show the same scan (a fresh install can try the tool without data)."""
    labels = {f: int(f in SAMPLE_FINDINGS) for f in CT_RATE_FINDINGS}
    return make_phantom(seed=SAMPLE_SEED, labels=labels)


def make_phantom(seed: int, labels: dict[str, int] | None = None, spacing: tuple[float, float, float] | None = None,
                 prevalence: float = 0.3, shift: str | list[str] | ScannerShift | None = None) -> Phantom:
    """One synthetic chest CT.

    ``labels`` forces findings on (1) or off (0); findings it does not name are drawn
    independently with probability ``prevalence``. ``spacing`` (mm along i, j, k)
    overrides the random scan geometry. ``shift`` names scanner/protocol variants
    (``synth.shift``: "noise", "sharp", "smooth", "thick", "arterial", "venous"): the same
    patient scanned differently; without it the phantom is what it always was. The
    result is bit-identical for a seed.
    """
    shift = parse_shift(shift)
    if not 0.0 <= float(prevalence) <= 1.0:
        raise InputError(f"Prevalence must lie between 0 and 1, not {prevalence}.")
    labels = _check_labels(labels)
    if spacing is not None:
        if len(spacing) != 3 or not all(0.3 <= float(s) <= 10.0 for s in spacing):
            raise InputError("Phantom spacing must be three values between 0.3 and 10 mm.")
    rng = np.random.default_rng(int(seed) & 0xFFFFFFFFFFFFFFFF)
    present = _draw_present(rng, labels, prevalence)

    geom = sample_geometry(rng, spacing)
    n_thin = _thin_acquisition(geom, shift)
    heart_scale, peri_mm = draw_heart(rng, present)
    contrast = bool(rng.random() < 0.3) or shift.phase is not None
    if shift.phase:
        geom["phase"] = shift.phase
    anat = build_anatomy(rng, geom, heart_scale=heart_scale, pericardial_fluid_mm=peri_mm, contrast=contrast)
    anat.p["z_table"] = float(np.round(rng.uniform(-420.0, -80.0), 1))
    ctx = PaintContext(anat, rng)
    facts = mark_heart(ctx, present, heart_scale, peri_mm)
    paint_normal_nodes(ctx, bool(present["Lymphadenopathy"]))

    # One random stream per painter and one for the scanner stage, split off the seed
    # rather than drawn in sequence: turning one finding on or off (``labels``) then leaves
    # the other lesions, the ECG leads and the noise as they were (counterfactual twins).
    *painter_rngs, scanner_rng = rng.spawn(len(PAINTERS) + 1)
    for (name, painter), painter_rng in zip(PAINTERS.items(), painter_rngs):
        if present[name]:
            ctx.rng = painter_rng
            facts[name] = painter(ctx)

    rng = ctx.rng = scanner_rng
    vol_hu, n_ecg = scan(ctx, shift)
    if n_thin:
        vol_hu, ctx.mask = thick_slices(vol_hu, ctx.mask, n_thin)
        g = anat.grid
        anat.grid = Grid(vol_hu.shape, (g.spacing[0], g.spacing[1], g.spacing[2] * n_thin),
                         (g.origin[0], g.origin[1], g.origin[2] + 0.5 * (n_thin - 1) * g.spacing[2]))
    _check_mask(seed, ctx.mask, present)
    volume = _volume(anat, vol_hu, seed)
    report = make_report(rng, present, facts, anat)
    meta = {
        "seed": int(seed),
        "generator_version": GENERATOR_VERSION,
        "spacing": [float(s) for s in anat.grid.spacing],
        "shape_kji": list(vol_hu.shape),
        "contrast": contrast,
        "contrast_inflow": anat.p["inflow"] is not None,
        "ecg_electrodes": n_ecg,
        "noise_hu": anat.p["noise_hu"],
        "body_half_axes_mm": [round(anat.p["A"], 1), round(anat.p["B"], 1)],
        "rotation_deg": round(float(np.rad2deg(anat.p["angle"])), 2),
        "findings": _jsonable(facts),
    }
    if not shift.is_identity:  # only then: unshifted meta stays as it was
        meta["shift"] = shift.names
        meta["contrast_phase"] = shift.phase
    return Phantom(volume=volume, mask=ctx.mask, labels={k: int(present[k]) for k in CT_RATE_FINDINGS}, report=report, meta=meta)


def _thin_acquisition(geom: dict[str, Any], shift: ScannerShift) -> int:
    """For a thick-slice shift, the phantom is drawn on thin slices (how many make one
    thick slice is returned; 0 without the shift) and averaged afterwards."""
    if not shift.slice_mm:
        return 0
    sx, sy, sz = geom["spacing"]
    thin, n = thin_source_spacing(shift.slice_mm, sz)
    geom["spacing"] = (sx, sy, thin)
    return n


def _draw_present(rng: np.random.Generator, labels: dict[str, int] | None, prevalence: float) -> dict[str, int]:
    """Which findings the phantom shows: forced by ``labels``, else drawn. One draw per
    finding in fixed order either way keeps seeds stable."""
    present = {}
    for name in CT_RATE_FINDINGS:
        draw = rng.random() < prevalence
        present[name] = int(labels[name]) if labels is not None and name in labels else int(draw)
    return present


def _check_mask(seed: int, mask: np.ndarray, present: dict[str, int]) -> None:
    """Labels and masks agree by construction; verify (cheap) rather than trust."""
    bits = np.bitwise_or.reduce(mask, axis=None) if mask.size else 0
    for name in CT_RATE_FINDINGS:
        if bool(int(bits) & BIT[name]) != bool(present[name]):
            raise MedAlignError(f"Phantom {seed}: mask and label disagree for {name}.")


def _volume(anat: Anatomy, vol_hu: np.ndarray, seed: int) -> Volume:
    """The HU array as a RAS ``Volume``: the grid is LPS, the table height shifts z."""
    sx, sy, sz = anat.grid.spacing
    x0, y0, z0 = anat.grid.origin
    ijk_to_ras = np.array([[-sx, 0, 0, -x0], [0, -sy, 0, -y0], [0, 0, sz, z0 + anat.p["z_table"]], [0, 0, 0, 1]], dtype=np.float64)
    return Volume(vol_hu, ijk_to_ras, metadata={"modality": "CT", "source": "medalign phantom", "seed": int(seed)})


def _jsonable(obj: Any) -> Any:
    """The facts with NumPy scalars and arrays turned into plain Python (``meta`` is JSON)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj



# --------------------------------------------------------------------------------------
# dataset writing
# --------------------------------------------------------------------------------------


def _write_nifti(array: np.ndarray, ijk_to_ras: np.ndarray, path: Path) -> None:
    """Atomic NIfTI write with SimpleITK (RAS affine -> ITK's LPS origin/direction)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    lps = np.diag([-1.0, -1.0, 1.0]) @ m[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps / spacing).ravel()])
    image.SetOrigin([float(v) for v in (np.diag([-1.0, -1.0, 1.0]) @ m[:3, 3])])
    with atomic_output(path) as tmp:
        sitk.WriteImage(image, str(tmp), True)


def _csv_text(rows: list[list[Any]]) -> str:
    """Rows as CSV text with newline line ends (the same bytes on every platform)."""
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _write_case(job: tuple) -> tuple[str, dict[str, int], str]:
    """One dataset case (runs in a worker process): its volume and mask files, and its
    id, labels and report for the CSVs."""
    out, seed, index, forced, prevalence, shift = job
    cid = f"phantom_{seed}_{index:05d}"
    ph = make_phantom(case_seed(seed, index), labels=forced, prevalence=prevalence, shift=shift)
    _write_nifti(ph.volume.array, ph.volume.ijk_to_ras, out / "volumes" / f"{cid}.nii.gz")
    _write_nifti(ph.mask, ph.volume.ijk_to_ras, out / "masks" / f"{cid}.nii.gz")
    return cid, ph.labels, ph.report


def write_dataset(out_dir: Path, n: int, seed: int, prevalence: float = 0.3, progress: bool = True,
                  on_progress: Callable[[float, str], None] | None = None, findings: list[str] | None = None,
                  workers: int | None = 1, shift: str | list[str] | ScannerShift | None = None) -> Path:
    """Write ``n`` phantoms: volumes/, masks/, labels.csv, reports.csv, manifest.json.

    Case ``i`` is ``make_phantom(case_seed(seed, i), labels=...)`` so any case can be
    rebuilt alone. ``findings`` restricts which findings may appear (others are forced
    absent); ``on_progress(fraction, message)`` lets the CLI drive its own reporter.
    ``workers`` processes build cases in parallel (None: every core); the files do not
    depend on it. ``shift`` scans every case with the named scanner/protocol variants
    (``make_phantom``); the same seed then gives the same patients, scanned differently.
    """
    shift = parse_shift(shift)
    forced = None
    if findings is not None:
        _check_labels({f: 1 for f in findings})
        forced = {name: 0 for name in CT_RATE_FINDINGS if name not in set(findings)}
    if int(n) < 1:
        raise InputError(f"The number of phantoms must be at least 1, not {n}.")
    if not 0.0 <= float(prevalence) <= 1.0:
        raise InputError(f"Prevalence must lie between 0 and 1, not {prevalence}.")
    out = Path(out_dir)
    try:
        (out / "volumes").mkdir(parents=True, exist_ok=True)
        (out / "masks").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot create the output folder {out} ({exc.strerror}).") from exc
    label_rows: list[list[Any]] = [["VolumeName", *CT_RATE_FINDINGS]]
    report_rows: list[list[Any]] = [["VolumeName", "report_text"]]
    bar = None
    if progress and on_progress is None:
        from tqdm import tqdm

        bar = tqdm(total=int(n), desc="phantoms", unit="ct")
    try:
        jobs = [(out, int(seed), index, forced, float(prevalence), shift) for index in range(int(n))]
        for done, (cid, labels, report) in enumerate(ordered_map(_write_case, jobs, workers), start=1):
            label_rows.append([f"{cid}.nii.gz", *[labels[k] for k in CT_RATE_FINDINGS]])
            report_rows.append([f"{cid}.nii.gz", report])
            if bar is not None:
                bar.update(1)
            if on_progress is not None:
                on_progress(done / int(n), cid)
    finally:
        if bar is not None:
            bar.close()
    _write_text(out / "labels.csv", _csv_text(label_rows))
    _write_text(out / "reports.csv", _csv_text(report_rows))
    manifest = {
        "generator": "medalign.synth.phantoms",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "n": int(n),
        "prevalence": float(prevalence),
        "phantom_findings": PHANTOM_FINDINGS,
        "allowed_findings": list(findings) if findings is not None else PHANTOM_FINDINGS,
        "findings_order": CT_RATE_FINDINGS,
        "mask_encoding": "int32 bitmask: bit f set where CT_RATE_FINDINGS[f] is present",
        "case_seed": "numpy SeedSequence([seed, index]).generate_state(1, uint32)[0]",
        "checksum_labels": zlib.crc32(_csv_text(label_rows).encode()) & 0xFFFFFFFF,
    }
    if not shift.is_identity:
        manifest["shift"] = shift.names
    _write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return out
