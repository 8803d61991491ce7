"""The CT check: real CTs pass, MR / label maps / broken volumes get one clear sentence."""

from __future__ import annotations

import numpy as np
import pytest

from medalign.core.errors import InputError
from medalign.core.volume import Volume
from medalign.inference.input_checks import MIN_SLICES, check_ct

AFFINE = np.diag([-0.8, -0.8, 2.5, 1.0])


def phantom(shape_kji=(40, 64, 64), dtype=np.int16, fov_padding: float | None = None, seed: int = 0) -> np.ndarray:
    """A chest-like CT in HU: air outside, a soft-tissue body, two lungs, a spine, noise."""
    rng = np.random.default_rng(seed)
    nk, nj, ni = shape_kji
    k, j, i = np.meshgrid(np.arange(nk), np.linspace(-1, 1, nj), np.linspace(-1, 1, ni), indexing="ij")
    hu = np.full(shape_kji, -1000.0, dtype=np.float32)
    body = (i / 0.85) ** 2 + (j / 0.6) ** 2 <= 1
    hu[body] = 40.0
    hu[body & ((i / 0.85) ** 2 + (j / 0.6) ** 2 > 0.8)] = -90.0  # subcutaneous fat
    for cx in (-0.4, 0.4):
        hu[((i - cx) / 0.28) ** 2 + (j / 0.4) ** 2 <= 1] = -850.0
    hu[(i**2 + (j - 0.4) ** 2) <= 0.01] = 700.0
    hu += rng.normal(0, 15, size=shape_kji).astype(np.float32)
    if fov_padding is not None:
        hu[i**2 + j**2 > 1.0] = fov_padding
    return hu.astype(dtype) if dtype != np.float32 else hu


def vol(array: np.ndarray, **metadata) -> Volume:
    return Volume(array, AFFINE, metadata=dict(metadata))


def refused(volume: Volume, *needles: str) -> str:
    with pytest.raises(InputError) as err:
        check_ct(volume)
    text = str(err.value)
    assert text and "\n" not in text
    for needle in needles:
        assert needle in text, text
    return text


# ------------------------------------------------------------------ synthetic CTs pass


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_synthetic_ct_passes(dtype):
    check_ct(vol(phantom(dtype=dtype)))


def test_ct_with_scanner_padding_outside_the_field_of_view_passes():
    check_ct(vol(phantom(fov_padding=-3024)))
    check_ct(vol(phantom(fov_padding=-2048)))


def test_ct_with_dicom_modality_ct_passes():
    check_ct(vol(phantom(), modality="CT", path="/data/series"))


def test_piecewise_constant_phantom_without_noise_is_not_taken_for_a_label_map():
    hu = np.full((20, 32, 32), -1000, np.int16)
    hu[:, 6:26, 4:28] = 40
    hu[:, 10:20, 6:14] = -850
    hu[:, 10:20, 18:26] = -850
    check_ct(vol(hu))


# ------------------------------------------------------------------ MR-like and other images


def mr_like(seed: int = 0) -> np.ndarray:
    """MR-ish: arbitrary positive units 0..2000, dark background near 0, no air at -1000."""
    rng = np.random.default_rng(seed)
    base = phantom(dtype=np.float32, seed=seed)
    mr = np.where(base < -500, 0.0, np.where(base > 300, 300.0, 900.0 + base * 8)).astype(np.float32)
    mr += np.abs(rng.normal(0, 20, size=mr.shape)).astype(np.float32)
    return np.clip(mr, 0, 2000)


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_mr_like_volume_is_refused(dtype):
    text = refused(vol(mr_like().astype(dtype), path="/x/brain_t1.nii.gz"), "brain_t1.nii.gz",
                   "does not look like a CT scan", "Hounsfield", "MedAlign screens CT only")
    assert "air or lung" in text


def test_normalised_images_are_refused():
    mr = mr_like()
    z = ((mr - mr.mean()) / mr.std()).astype(np.float32)  # z-scored MR: -1.5 .. 4
    refused(vol(z), "does not look like a CT scan")
    refused(vol((mr / mr.max()).astype(np.float32)), "does not look like a CT scan")  # 0 .. 1


def test_ct_without_rescale_intercept_is_refused():
    """Raw CT counts (HU + 1024): air sits at 0, so the values are not Hounsfield units."""
    refused(vol((phantom().astype(np.int32) + 1024).astype(np.int16)), "not in Hounsfield units")


def test_uniform_noise_over_a_wide_range_is_refused():
    rng = np.random.default_rng(1)
    noise = rng.uniform(-4096, 4096, size=(20, 40, 40)).astype(np.float32)
    refused(vol(noise), "does not look like a CT scan")


def test_label_map_is_refused():
    labels = np.zeros((20, 40, 40), np.int16)
    labels[:, 5:20, 5:20] = 1
    labels[:, 22:35, 10:30] = 7
    refused(vol(labels, path="seg.nii.gz"), "seg.nii.gz", "label map or segmentation", "3 distinct")
    refused(vol(labels.astype(np.float32)), "label map")


def test_constant_volume_is_refused():
    refused(vol(np.full((20, 30, 30), -1000, np.int16)), "same value (-1000) in every voxel")


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "infinite"), (-np.inf, "infinite")])
def test_nan_or_inf_is_refused(bad, word):
    hu = phantom(dtype=np.float32)
    hu[3, 4, 5] = bad
    refused(vol(hu), word)


def test_2d_and_too_few_slices_are_refused():
    refused(vol(phantom()[:1]), "2D")
    refused(vol(phantom()[:, :, :1]), "2D")
    refused(vol(phantom()[: MIN_SLICES - 3]), f"only {MIN_SLICES - 3} slices", f"at least {MIN_SLICES}")
    check_ct(vol(phantom()[:MIN_SLICES]))
    with pytest.raises(InputError):
        check_ct(Volume(np.zeros((30, 30), np.int16), np.eye(4)))


@pytest.mark.parametrize("modality", ["MR", "PT", "US", "mr"])
def test_other_dicom_modalities_are_refused_by_name(modality):
    # Even with CT-like voxels, a DICOM that says MR is not screened.
    refused(vol(phantom(), modality=modality, path="/d/series"), "series", f"{modality.upper()} scan",
            "not CT", "MedAlign screens CT only")


def test_check_does_not_modify_the_volume():
    hu = phantom()
    before = hu.copy()
    check_ct(vol(hu))
    np.testing.assert_array_equal(hu, before)


# ------------------------------------------------------------------ shared real data


@pytest.mark.parametrize(
    "name",
    ["abdomen_ct_3mm.nii.gz", "abdomen_ct_dicom", "chest_ct_lung_mass.nii.gz", "chest_cta_mediastinum_crop.nii.gz"],
)
def test_shared_ct_files_pass(real_ct, name):
    from medalign.core.volume_io import read_volume

    check_ct(read_volume(real_ct / name))


def test_shared_mr_is_refused(real_ct):
    from medalign.core.volume_io import read_volume

    text = refused(
        read_volume(real_ct / "mr_not_ct.nii.gz"),
        "mr_not_ct.nii.gz",
        "does not look like a CT scan (intensities are not in Hounsfield units:",
        "MedAlign screens CT only.",
    )
    assert text.count(".") <= 4  # one sentence (decimals aside)


def test_shared_segmentation_is_refused(real_ct):
    from medalign.core.volume_io import read_volume

    refused(read_volume(real_ct / "abdomen_ct_dicom_totalseg_labels.nii.gz"), "label map or segmentation")
