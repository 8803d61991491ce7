"""Scanner/protocol variants of the phantoms (``synth.shift``): each one changes the image in
the way it says, on the same patient, and nothing else; unshifted phantoms stay pinned by
test_behaviour_pinned.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medalign.cli.dispatch import main
from medalign.core.errors import InputError
from medalign.synth.anatomy import build_anatomy, sample_geometry
from medalign.synth.frame import body_to_lps
from medalign.synth.phantoms import make_phantom, write_dataset
from medalign.synth.shapes import blur3
from medalign.synth.shift import NOISE_FACTOR, parse_shift, thick_slices

SEED = 3


@pytest.fixture(scope="module")
def base():
    return make_phantom(SEED)


def _edge_sharpness(hu: np.ndarray) -> float:
    """The steepest in-plane steps (99.5th percentile of |dHU/di|): skin, bone and lung
    borders dominate it, so a sharper kernel raises it and a smoother one lowers it."""
    return float(np.percentile(np.abs(np.diff(hu.astype(np.float32), axis=2)), 99.5))


def _fine_noise(hu: np.ndarray) -> float:
    """Median |image - in-plane blur| over soft tissue and fat: the fine-grained noise."""
    a = hu.astype(np.float32)
    low = a.copy()
    blur3(low, (0.0, 1.0, 1.0))
    sel = (a > -200) & (a < 150)
    return float(np.median(np.abs(a - low)[sel]))


def test_noise_shift_scales_the_measured_noise_std(base):
    noisy = make_phantom(SEED, shift="noise")
    assert noisy.labels == base.labels and np.array_equal(noisy.mask, base.mask)
    # Same noise draw, scaled: the difference is (factor - 1) times the base noise, whose
    # std after the blur is the drawn level; measured in fat and soft tissue (no clipping).
    diff = noisy.volume.array.astype(np.float32) - base.volume.array
    soft = (base.volume.array > -300) & (base.volume.array < 300)
    expected = (NOISE_FACTOR - 1.0) * base.meta["noise_hu"]
    assert diff[soft].std() == pytest.approx(expected, rel=0.05)
    assert noisy.meta["noise_hu"] == pytest.approx(NOISE_FACTOR * base.meta["noise_hu"], abs=0.2)  # both rounded to 0.1
    assert noisy.meta["shift"] == ["noise"]


def test_kernels_sharpen_or_soften_edges_and_noise(base):
    sharp = make_phantom(SEED, shift="sharp").volume.array
    smooth = make_phantom(SEED, shift="smooth").volume.array
    b = base.volume.array
    assert _edge_sharpness(sharp) > 1.4 * _edge_sharpness(b) > 1.4 * 1.4 * _edge_sharpness(smooth)
    assert _fine_noise(sharp) > 1.8 * _fine_noise(b) > 1.8 * 3.0 * _fine_noise(smooth)
    # body densities stay where they were (a kernel redistributes, it does not add)
    soft = (b > -300) & (b < 300)
    for img in (sharp, smooth):
        assert abs(float(np.median(img[soft])) - float(np.median(b[soft]))) <= 3.0


def test_thick_shift_gives_5_mm_slices_over_the_same_extent(base):
    thick = make_phantom(SEED, shift="thick")
    assert thick.volume.spacing[2] == pytest.approx(5.0) and base.volume.spacing[2] != 5.0
    assert thick.volume.spacing[:2] == pytest.approx(base.volume.spacing[:2])
    extent = lambda ph: ph.volume.array.shape[0] * ph.volume.spacing[2]  # noqa: E731
    assert abs(extent(thick) - extent(base)) <= 5.0 + base.volume.spacing[2]
    assert thick.labels == base.labels and thick.mask.shape == thick.volume.array.shape
    assert thick.meta["spacing"][2] == pytest.approx(5.0)


def test_thick_slices_average_thin_ones_and_keep_every_finding_bit():
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1000, size=(7, 4, 5)).astype(np.int16)
    mask = np.zeros((7, 4, 5), dtype=np.int32)
    mask[6, 1, 1] = 4  # in the padded last slab only
    mask[1, 2, 3] = 1
    t_hu, t_mask = thick_slices(hu, mask, 3)
    assert t_hu.shape == (3, 4, 5) and t_mask.dtype == np.int32
    assert np.array_equal(t_hu[0], np.rint(hu[0:3].astype(np.float32).mean(axis=0)).astype(np.int16))
    assert np.array_equal(t_hu[2], hu[6])  # padded with the last slice itself
    assert t_mask[0, 2, 3] == 1 and t_mask[2, 1, 1] == 4 and t_mask.sum() == 5


def _anatomy(phase: str | None, contrast: bool):
    rng = np.random.default_rng(7)
    geom = sample_geometry(rng, (2.5, 2.5, 5.0))
    if phase:
        geom["phase"] = phase
    return build_anatomy(rng, geom, contrast=contrast)


def _aorta_and_liver_hu(anat) -> tuple[float, float]:
    p = anat.p
    liver = body_to_lps(p, np.array([-0.5 * p["a_c"], p["vc"], p["zL"] - 40.0]))
    return float(anat.hu[anat.grid.index(p["aorta_pts"][2])]), float(anat.hu[anat.grid.index(liver)])


def test_contrast_phases_enhance_vessels_and_organs_as_stated():
    aorta_plain, liver_plain = _aorta_and_liver_hu(_anatomy(None, False))
    aorta_art, liver_art = _aorta_and_liver_hu(_anatomy("arterial", True))
    aorta_ven, liver_ven = _aorta_and_liver_hu(_anatomy("venous", True))
    assert aorta_plain < 60 and 300 <= aorta_art <= 420 and 150 <= aorta_ven <= 200
    assert liver_art - liver_plain == pytest.approx(10.0, abs=0.5)
    assert liver_ven - liver_plain == pytest.approx(50.0, abs=0.5)


def test_phase_shift_forces_contrast_on_every_case():
    plain = [make_phantom(s, spacing=(2.5, 2.5, 5.0)) for s in range(6)]
    assert not all(ph.meta["contrast"] for ph in plain)  # the draw leaves most unenhanced
    for s in range(6):
        ph = make_phantom(s, spacing=(2.5, 2.5, 5.0), shift="venous")
        assert ph.meta["contrast"] and ph.meta["contrast_phase"] == "venous" and not ph.meta["contrast_inflow"]


def test_parse_shift_refuses_unknown_and_contradictory_names():
    assert parse_shift(None).is_identity and parse_shift("").is_identity
    assert parse_shift("noise, thick").names == ["noise", "thick"]
    with pytest.raises(InputError, match="Unknown scanner shift 'blurry'"):
        parse_shift("noise,blurry")
    with pytest.raises(InputError, match="'sharp' and 'smooth' cannot be combined"):
        parse_shift("sharp,smooth")
    with pytest.raises(InputError, match="'arterial' and 'venous' cannot be combined"):
        parse_shift(["arterial", "venous"])


def test_write_dataset_with_shift_records_it_and_keeps_the_labels(tmp_path):
    plain = write_dataset(tmp_path / "a", 2, seed=1, progress=False)
    shifted = write_dataset(tmp_path / "b", 2, seed=1, progress=False, shift="noise,smooth")
    assert (plain / "labels.csv").read_text() == (shifted / "labels.csv").read_text()
    assert "shift" not in json.loads((plain / "manifest.json").read_text())
    assert json.loads((shifted / "manifest.json").read_text())["shift"] == ["noise", "smooth"]


def test_cli_phantoms_shift(tmp_path, capsys):
    assert main(["phantoms", "--out", str(tmp_path / "s"), "--n", "1", "--shift", "thick", "--workers", "1"]) == 0
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["shift"] == ["thick"]
    assert main(["phantoms", "--out", str(tmp_path / "t"), "--n", "1", "--shift", "fuzzy"]) == 2
    assert "medalign: error: Unknown scanner shift 'fuzzy'" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
