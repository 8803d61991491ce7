"""Preprocessing per profile and the model-grid <-> RAS round trip through token maps."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medalign.core.errors import InputError
from medalign.core.volume import Volume
from medalign.inference.preprocess import PreparedImage, grid_to_ras_points, hu_to_model_value, prepare, token_map_to_volume
from medalign.models.profiles import BRGSA, CTCLIP, DEMO, MERLIN


def rotation(ax: float, az: float) -> np.ndarray:
    cz, sz, cx, sx = np.cos(az), np.sin(az), np.cos(ax), np.sin(ax)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rx @ rz


# Three ways a CT can be stored: the usual LPS-ordered file (RAS matrix diag(-,-,+)),
# a RAS-ordered file (flipped voxel order), and an oblique acquisition.
GEOMETRIES = {
    "lps_axial": np.diag([-1.0, -1.0, 1.0]),
    "ras_flipped": np.eye(3),
    "oblique": rotation(0.25, 0.4) @ np.diag([-1.0, -1.0, 1.0]),
}


def volume_with_blob(direction, centre_ras, shape_ijk=(60, 56, 40), spacing=(3.0, 3.2, 4.0),
                     radius=10.0, background=-1000, blob=600, dtype=np.int16) -> Volume:
    """Air with a dense ball at a known RAS position (the voxel grid is centred near 0)."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction) @ np.diag(spacing)
    centre_ijk = (np.asarray(shape_ijk) - 1) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre_ijk
    vol = Volume(np.full(shape_ijk[::-1], background, dtype=dtype), affine)
    k, j, i = np.indices(vol.array.shape)
    ras = vol.ijk_to_ras_points(np.stack([i, j, k], -1).reshape(-1, 3)).reshape(*vol.array.shape, 3)
    inside = ((ras - np.asarray(centre_ras)) ** 2).sum(-1) <= radius**2
    vol.array[inside] = blob
    return vol


def small(profile, size=(48, 48, 32)):
    """The same recipe at a smaller grid, to keep map-back tests fast."""
    return dataclasses.replace(profile, size=size)


# ------------------------------------------------------------------ shapes and values


@pytest.mark.parametrize("profile", [DEMO, BRGSA, CTCLIP, MERLIN], ids=lambda p: p.name)
def test_output_shape_dtype_and_range_per_profile(profile):
    vol = volume_with_blob(np.diag([-1.0, -1.0, 1.0]), (0, 0, 0), shape_ijk=(24, 24, 12), spacing=(4.0, 4.0, 6.0))
    prepared = prepare(vol, profile)
    assert isinstance(prepared, PreparedImage)
    assert tuple(prepared.tensor.shape) == (1, profile.n_channels, *profile.size)
    assert prepared.tensor.dtype == torch.float32
    assert prepared.grid_to_ras.shape == (4, 4) and prepared.grid_to_ras.dtype == np.float64
    assert prepared.source_shape_ijk == (24, 24, 12)
    assert prepared.profile is profile
    lo = hu_to_model_value(-10_000, profile)
    hi = hu_to_model_value(10_000, profile)
    assert float(prepared.tensor.min()) >= lo - 1e-5 and float(prepared.tensor.max()) <= hi + 1e-5
    np.testing.assert_allclose(np.linalg.norm(prepared.grid_to_ras[:3, :3], axis=0), profile.spacing, rtol=1e-6)


def test_hu_to_model_value_matches_the_published_recipes():
    # BrgSA: clamp [-1000, 1000], scale to [-1, 1], then (x - 0.4978) / 0.2449.
    assert hu_to_model_value(0, BRGSA) == pytest.approx((0 - 0.4978) / 0.2449)
    assert hu_to_model_value(-1024, BRGSA) == pytest.approx((-1 - 0.4978) / 0.2449)
    # CT-CLIP: clip [-1000, 1000], divide by 1000.
    assert hu_to_model_value(250, CTCLIP) == pytest.approx(0.25)
    assert hu_to_model_value(3000, CTCLIP) == pytest.approx(1.0)
    assert hu_to_model_value(-1000, DEMO) == pytest.approx(-1.0)
    # Merlin: ScaleIntensityRanged(a_min=-1000, a_max=1000, b_min=0, b_max=1, clip=True).
    assert hu_to_model_value(0, MERLIN) == pytest.approx(0.5)
    assert hu_to_model_value(-3000, MERLIN) == pytest.approx(0.0)


@pytest.mark.parametrize("after", [True, False], ids=["pad-after-resample", "fused"])
def test_padding_after_the_resample_never_blends_the_scan_into_the_pad(after):
    """Merlin pads with MONAI's SpatialPadd after Spacingd: a scan upsampled 2x in-plane keeps
    its edge value up to its last voxel centre, and every padded voxel is exactly the pad
    value; the fused resample blends the first padded voxel with the scan instead."""
    vol = Volume(np.full((12, 20, 20), 500, dtype=np.int16), np.diag([3.0, 3.0, 3.0, 1.0]))
    profile = dataclasses.replace(MERLIN, size=(48, 48, 16), pad_after_resample=after)
    t = prepare(vol, profile).tensor[0, 0]
    values = set(np.unique(t.numpy().round(5)).tolist())
    if after:
        assert values == {0.0, 0.75}
        assert int((t - 0.75).abs().le(1e-6).sum()) == 39 * 39 * 12  # (20 - 1) * 2 + 1 samples in-plane
    else:
        assert len(values - {0.0, 0.75}) > 0


@pytest.mark.parametrize(
    "profile, hu, expected",
    [
        (BRGSA, 0, (0.0 - 0.4978) / 0.2449),
        (BRGSA, 500, (0.5 - 0.4978) / 0.2449),
        (CTCLIP, 0, 0.0),
        (CTCLIP, 1500, 1.0),  # clipped at the window
        (DEMO, -300, -0.3),
        (MERLIN, 400, 0.7),  # [-1000, 1000] -> [0, 1]
    ],
    ids=["brgsa0", "brgsa500", "ctclip0", "ctclip1500", "demo-300", "merlin400"],
)
def test_constant_region_maps_exactly_and_padding_gets_pad_value(profile, hu, expected):
    vol = Volume(np.full((10, 16, 16), hu, dtype=np.int16), np.diag([-1.5, -1.5, 2.0, 1.0]))
    # value mapping only: the anti-alias filter would blend this 24 mm cube with its padding
    prepared = prepare(vol, dataclasses.replace(small(profile, (40, 40, 24)), antialias=False))
    t = prepared.tensor[0, 0]
    # The centre lies inside the (small) volume, the corner is padding.
    assert float(t[20, 20, 12]) == pytest.approx(expected, abs=1e-5)
    pad = (profile.out_range[0] - (profile.mean or 0.0)) / (profile.std or 1.0)
    assert float(t[0, 0, 0]) == pytest.approx(pad, abs=1e-5)
    assert float(t[0, 0, 0]) == pytest.approx(hu_to_model_value(profile.pad_hu, profile), abs=1e-6)


def test_float_and_int16_inputs_give_the_same_tensor_and_input_is_untouched():
    vol = volume_with_blob(np.diag([-1.0, -1.0, 1.0]), (5, -3, 2))
    before = vol.array.copy()
    as_float = Volume(vol.array.astype(np.float32), vol.ijk_to_ras)
    a = prepare(vol, small(DEMO)).tensor
    b = prepare(as_float, small(DEMO), device=torch.device("cpu")).tensor
    torch.testing.assert_close(a, b)
    np.testing.assert_array_equal(vol.array, before)
    np.testing.assert_array_equal(as_float.array, before.astype(np.float32))


def test_axes_follow_profile_axcodes():
    """An LPS-stored and a RAS-stored copy of the same anatomy give the same model tensor."""
    lps = volume_with_blob(GEOMETRIES["lps_axial"], (20, -15, 10))
    ras = Volume(np.ascontiguousarray(lps.array[:, ::-1, ::-1]), lps.ijk_to_ras.copy())
    ni, nj, _ = lps.shape_ijk
    ras.ijk_to_ras[:3, 0] *= -1
    ras.ijk_to_ras[:3, 1] *= -1
    ras.ijk_to_ras[:3, 3] = lps.ijk_to_ras_points([[ni - 1, nj - 1, 0]])[0]
    a = prepare(lps, small(DEMO))
    b = prepare(ras, small(DEMO))
    np.testing.assert_allclose(a.grid_to_ras, b.grid_to_ras, atol=1e-6)
    # float32 resampling order differs; the lung-window channel magnifies it 4x (500 HU window)
    torch.testing.assert_close(a.tensor, b.tensor, atol=1e-4, rtol=1e-4)
    # LPS codes: x grows towards Left (RAS x decreases), z towards Superior.
    assert a.grid_to_ras[0, 0] < 0 and a.grid_to_ras[1, 1] < 0 and a.grid_to_ras[2, 2] > 0


def test_bad_arrays_are_refused():
    with pytest.raises(InputError):
        prepare(Volume(np.zeros((10, 10), np.int16), np.eye(4)), DEMO)


# ------------------------------------------------------------------ round trips to RAS


def blob_centre_ras(prepared: PreparedImage) -> np.ndarray:
    t = prepared.tensor[0, 0].numpy()
    w = np.clip(t - t.min(), 0, None)
    idx = np.indices(t.shape).reshape(3, -1).T
    centroid = (idx * w.reshape(-1, 1)).sum(0) / w.sum()
    return grid_to_ras_points(prepared, centroid)[0]


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_blob_in_prepared_tensor_maps_back_to_its_ras_position(geometry):
    target = np.array([22.0, -18.0, 14.0])
    vol = volume_with_blob(GEOMETRIES[geometry], target)
    prepared = prepare(vol, small(DEMO))
    # The centroid is computed on a 4-5 mm grid from a 3-4 mm sampled ball: within 1 mm.
    np.testing.assert_allclose(blob_centre_ras(prepared), target, atol=1.0)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_linear_hu_ramp_is_reproduced_exactly_at_grid_to_ras_positions(geometry):
    """Trilinear resampling reproduces a linear field exactly, so every model voxel inside
    the input must hold the ramp's value at ``grid_to_ras`` of its index: a sub-millimetre
    check of the whole geometry chain (orientation, spacing, crop/pad)."""
    gradient = np.array([2.0, -1.5, 1.0])  # HU per mm, stays inside the [-1000, 1000] window
    affine = np.eye(4)
    affine[:3, :3] = GEOMETRIES[geometry] @ np.diag([3.0, 3.2, 4.0])
    shape_ijk = (50, 46, 36)
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape_ijk) - 1) / 2.0) + [7.0, -4.0, 3.0]
    k, j, i = np.indices(shape_ijk[::-1])
    ref = Volume(np.zeros(shape_ijk[::-1], np.float32), affine)
    ras = ref.ijk_to_ras_points(np.stack([i, j, k], -1).reshape(-1, 3))
    ref.array[:] = (ras @ gradient).reshape(ref.array.shape)
    profile = small(DEMO)
    prepared = prepare(ref, profile)
    t = prepared.tensor[0, 0].numpy()
    idx = np.indices(t.shape).reshape(3, -1).T
    grid_ras = grid_to_ras_points(prepared, idx)
    # Model voxels at least one input voxel inside the input's bounds.
    ijk = ref.ras_to_ijk_points(grid_ras)
    inside = np.all((ijk >= 1) & (ijk <= np.asarray(shape_ijk) - 2), axis=1)
    assert inside.sum() > 1000
    expected_hu = grid_ras[inside] @ gradient
    got_hu = t.reshape(-1)[inside] * 1000.0  # DEMO: [-1000, 1000] HU -> [-1, 1]
    np.testing.assert_allclose(got_hu, expected_hu, atol=0.5)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_one_hot_token_map_peaks_at_the_token_centre(geometry):
    vol = volume_with_blob(GEOMETRIES[geometry], (0, 0, 0))
    profile = small(DEMO)
    prepared = prepare(vol, profile)
    patch = (8, 8, 4)
    grid = [s // p for s, p in zip(profile.size, patch)]  # (6, 6, 8)
    token = (2, 3, 5)
    tokens = torch.zeros(grid)
    tokens[token] = 1.0
    centre_grid = np.asarray(token) * patch + (np.asarray(patch) - 1) / 2.0
    expected = grid_to_ras_points(prepared, centre_grid)[0]
    amap = token_map_to_volume(tokens, prepared, patch, vol)
    assert amap.array.dtype == np.float32 and amap.metadata == {"kind": "alignment_map"}
    peak = np.unravel_index(np.argmax(amap.array), amap.array.shape)
    peak_ras = amap.ijk_to_ras_points([peak[::-1]])[0]
    # The trilinear kernel peaks exactly at the token centre: the nearest map voxel is
    # within half a map voxel along each of the map's axes.
    offset = np.linalg.solve(amap.ijk_to_ras[:3, :3], peak_ras - expected)
    assert np.all(np.abs(offset) <= 0.5 + 1e-6), offset
    assert float(amap.array.max()) <= 1.0 + 1e-6


def test_token_offset_from_the_model_layout_moves_the_peak():
    """A strided CNN's position a is centred on grid voxel a*p (Merlin's ``token_layout``
    offset 0), not on the middle of its block: the map must put the peak there."""
    vol = volume_with_blob(GEOMETRIES["lps_axial"], (0, 0, 0))
    prepared = prepare(vol, small(DEMO))
    patch, token = (8, 8, 4), (2, 3, 5)
    tokens = torch.zeros(6, 6, 8)
    tokens[token] = 1.0
    first = np.asarray(token) * patch
    for offset, centre in ((None, first + (np.asarray(patch) - 1) / 2.0), ((0.0, 0.0, 0.0), first)):
        amap = token_map_to_volume(tokens, prepared, patch, vol, offset=offset)
        peak = np.unravel_index(np.argmax(amap.array), amap.array.shape)
        peak_ras = amap.ijk_to_ras_points([peak[::-1]])[0]
        miss = np.linalg.solve(amap.ijk_to_ras[:3, :3], peak_ras - grid_to_ras_points(prepared, centre)[0])
        assert np.all(np.abs(miss) <= 0.5 + 1e-6), (offset, miss)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_end_to_end_blob_to_token_map_to_volume(geometry):
    """A ball placed at a known RAS point: prepare -> token means -> map -> peak within a token."""
    target = np.array([-25.0, 20.0, -12.0])
    vol = volume_with_blob(GEOMETRIES[geometry], target, radius=12.0)
    profile = small(DEMO)
    prepared = prepare(vol, profile)
    patch = (4, 4, 4)
    tokens = F.avg_pool3d(prepared.tensor, kernel_size=patch)[0, 0]
    amap = token_map_to_volume(tokens - tokens.min(), prepared, patch, vol)
    peak = np.unravel_index(np.argmax(amap.array), amap.array.shape)
    peak_ras = amap.ijk_to_ras_points([peak[::-1]])[0]
    token_mm = np.asarray(patch) * np.asarray(profile.spacing)
    assert np.linalg.norm(peak_ras - target) <= np.linalg.norm(token_mm) / 2, (peak_ras, target)


def test_map_grid_follows_the_reference_and_stays_inside_it():
    ref = volume_with_blob(GEOMETRIES["oblique"], (0, 0, 0), shape_ijk=(60, 56, 40), spacing=(3.0, 3.2, 4.0))
    prepared = prepare(ref, small(DEMO))
    tokens = torch.ones((6, 6, 8))
    amap = token_map_to_volume(tokens, prepared, (8, 8, 4), ref)
    ref_dirs = ref.ijk_to_ras[:3, :3] / np.asarray(ref.spacing)
    map_dirs = amap.ijk_to_ras[:3, :3] / np.asarray(amap.spacing)
    np.testing.assert_allclose(map_dirs, ref_dirs, atol=1e-9)
    # Same first and last voxel centres: exactly the reference's extent.
    np.testing.assert_allclose(amap.ijk_to_ras[:3, 3], ref.ijk_to_ras[:3, 3])
    last_map = amap.ijk_to_ras_points([np.asarray(amap.shape_ijk) - 1])[0]
    last_ref = ref.ijk_to_ras_points([np.asarray(ref.shape_ijk) - 1])[0]
    np.testing.assert_allclose(last_map, last_ref, atol=1e-6)
    # Default spacing: half the smallest token (16 mm / 2 = 8 mm... here 4 mm * 4 / 2), never finer than ref.
    assert all(s >= r - 1e-9 for s, r in zip(amap.spacing, ref.spacing))
    assert all(abs(s - 10.0) <= 3.0 for s in amap.spacing)
    # A constant token map gives that constant wherever the model saw the volume.
    inside = amap.array > 0
    assert inside.mean() > 0.5
    np.testing.assert_allclose(amap.array[inside], 1.0, atol=1e-6)


def test_map_voxels_outside_the_models_field_of_view_are_zero():
    # A 300 mm wide reference and a 48 x 4 mm = 192 mm model field of view.
    ref = volume_with_blob(GEOMETRIES["lps_axial"], (0, 0, 0), shape_ijk=(100, 100, 30), spacing=(3.0, 3.0, 4.0))
    prepared = prepare(ref, small(DEMO))
    amap = token_map_to_volume(torch.full((6, 6, 8), 2.0), prepared, (8, 8, 4), ref, spacing_mm=6.0)
    np.testing.assert_allclose(amap.spacing, (6.0, 6.0, 6.0), atol=0.2)
    k, j, i = np.indices(amap.array.shape)
    ras = amap.ijk_to_ras_points(np.stack([i, j, k], -1).reshape(-1, 3))
    grid = (ras - prepared.grid_to_ras[:3, 3]) @ np.linalg.inv(prepared.grid_to_ras[:3, :3]).T
    seen = np.all((grid >= -0.5) & (grid <= np.asarray((48, 48, 32)) - 0.5), axis=1).reshape(amap.array.shape)
    assert seen.any() and (~seen).any()
    np.testing.assert_array_equal(amap.array[~seen], 0.0)
    np.testing.assert_allclose(amap.array[seen], 2.0, rtol=1e-6)


def test_token_map_shapes_and_types_are_accepted_or_refused():
    ref = volume_with_blob(GEOMETRIES["lps_axial"], (0, 0, 0))
    prepared = prepare(ref, small(DEMO))
    a = token_map_to_volume(np.ones((1, 1, 6, 6, 8), np.float64), prepared, (8, 8, 4), ref)
    b = token_map_to_volume(torch.ones((6, 6, 8), dtype=torch.float16), prepared, (8, 8, 4), ref)
    assert a.array.dtype == np.float32 and b.array.dtype == np.float32
    np.testing.assert_allclose(a.array, b.array)
    with pytest.raises(InputError):
        token_map_to_volume(np.ones((2, 6, 6, 8)), prepared, (8, 8, 4), ref)
    with pytest.raises(InputError):
        token_map_to_volume(np.ones((6, 6, 8)), prepared, (8, 8, 4), ref, spacing_mm=0.0)


def test_shared_chest_ct_lung_mass_lands_in_its_box(real_ct):
    """Real data: the HU-dense lung mass in the prepared tensor maps back into the expert's box."""
    import json

    from medalign.core.volume_io import read_volume

    vol = read_volume(real_ct / "chest_ct_lung_mass.nii.gz")
    prepared = prepare(vol, DEMO)
    assert tuple(prepared.tensor.shape) == (1, DEMO.n_channels, 96, 96, 64)
    boxes = json.loads((real_ct / "chest_ct_lung_mass.boxes.json").read_text(encoding="utf-8"))
    lo = np.asarray(boxes["ras_box_mm"]["min"])
    hi = np.asarray(boxes["ras_box_mm"]["max"])
    centre = (lo + hi) / 2
    # The box centre, taken to the model grid and back, is the same point.
    inv = np.linalg.inv(prepared.grid_to_ras)
    xyz = centre @ inv[:3, :3].T + inv[:3, 3]
    np.testing.assert_allclose(grid_to_ras_points(prepared, xyz)[0], centre, atol=1e-6)
    # The mass is soft tissue inside the lung: the model voxel at the box centre is dense.
    value = float(prepared.tensor[0, 0][tuple(np.rint(xyz).astype(int))])
    assert value > hu_to_model_value(-300, DEMO)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the CPU path is tested above")
def test_cuda_path_matches_cpu():
    vol = volume_with_blob(GEOMETRIES["oblique"], (10, -5, 8))
    profile = small(BRGSA)
    cpu = prepare(vol, profile, device="cpu")
    gpu = prepare(vol, profile, device="cuda")
    assert gpu.tensor.is_cuda and gpu.tensor.dtype == torch.float32
    torch.testing.assert_close(gpu.tensor.cpu(), cpu.tensor, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(gpu.grid_to_ras, cpu.grid_to_ras, atol=1e-9)
    tokens = torch.arange(6 * 6 * 8, dtype=torch.float32).reshape(6, 6, 8)
    a = token_map_to_volume(tokens, cpu, (8, 8, 4), vol)
    b = token_map_to_volume(tokens.cuda(), gpu, (8, 8, 4), vol)
    np.testing.assert_allclose(b.array, a.array, atol=1e-3)


def test_antialias_smooths_fine_scans_only_when_downsampling():
    """The demo profile low-passes a fine, noisy scan before the coarse resample; the
    published profiles never do (their recipes have no such step)."""
    rng = np.random.default_rng(0)
    noisy = Volume(rng.normal(0, 200, (40, 96, 96)).astype(np.float32), np.diag([-0.8, -0.8, 1.0, 1.0]))
    smooth = prepare(noisy, small(DEMO)).tensor[0, 0, 19:29, 19:29, 14:18]
    sharp = prepare(noisy, dataclasses.replace(small(DEMO), antialias=False)).tensor[0, 0, 19:29, 19:29, 14:18]
    assert float(smooth.std()) < 0.6 * float(sharp.std())
    assert not BRGSA.antialias and not CTCLIP.antialias


@pytest.mark.parametrize("dim,radius", [(1, 1), (2, 2), (3, 3), (3, 9)])
def test_window_max_equals_max_pool(dim, radius):
    """The running max for the "max" channel replaced max_pool3d (10 s per axis on a 512x512x300 CT):
    the same values, window clipped at the ends (radius 9 exceeds the axis of 6)."""
    from medalign.inference.preprocess import _window_max

    x = torch.from_numpy(np.random.default_rng(dim).normal(size=(1, 7, 8, 6)).astype(np.float32))
    ours = _window_max(x, dim, radius)
    if radius <= x.shape[dim] // 2:  # max_pool3d refuses a padding over half its kernel
        kernel = [1, 1, 1]
        kernel[dim - 1] = 2 * radius + 1
        pool = F.max_pool3d(x[None], kernel_size=kernel, stride=1, padding=[k // 2 for k in kernel])[0]
        assert torch.equal(ours, pool)
    expected = x.clone()
    for i in range(x.shape[dim]):
        lo, hi = max(0, i - radius), min(x.shape[dim], i + radius + 1)
        expected.narrow(dim, i, 1).copy_(x.narrow(dim, lo, hi - lo).amax(dim=dim, keepdim=True))
    assert torch.equal(ours, expected)
