"""Volume I/O: format round trips with RAS geometry, DICOM series, shared files, bad inputs."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medalign.core.atomic import atomic_output
from medalign.core.atomic import write_text as atomic_write_text
from medalign.core.errors import InputError, MedAlignError
from medalign.core.volume import Volume
from medalign.core.volume_io import read_volume, write_volume

LPS = np.diag([-1.0, -1.0, 1.0])


def rotation(ax: float, az: float) -> np.ndarray:
    """A proper rotation (oblique direction): az about z, then ax about x."""
    cz, sz, cx, sx = np.cos(az), np.sin(az), np.cos(ax), np.sin(ax)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rx @ rz


def make_volume(dtype=np.int16, shape_ijk=(12, 10, 9), spacing=(0.8, 0.9, 2.5), direction=None,
                origin=(5.0, -7.0, 30.0)):
    """A deterministic volume whose every voxel differs from its neighbours."""
    i, j, k = shape_ijk
    values = (np.arange(i * j * k).reshape(k, j, i) * 37 % 2900 - 1200).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        values = values + np.asarray(0.25, dtype)
    direction = np.eye(3) if direction is None else np.asarray(direction)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(spacing)
    affine[:3, 3] = origin
    return Volume(values, affine)


def sitk_image(volume: Volume) -> sitk.Image:
    """Build the ITK image independently of medalign.core.volume_io (LPS geometry by hand)."""
    img = sitk.GetImageFromArray(volume.array)
    lps = LPS @ volume.ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lps / spacing).ravel().tolist())
    img.SetOrigin((LPS @ volume.ijk_to_ras[:3, 3]).tolist())
    return img


def write_dicom_series(folder: Path, volume: Volume, modality: str = "CT", uid: str | None = None,
                       skip: tuple[int, ...] = (), reverse_names: bool = True) -> list[Path]:
    """Write a synthetic DICOM series slice by slice (CT tags, rescale intercept -1024)."""
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk_image(volume)
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    uid = uid or f"1.2.826.0.1.3680043.2.1125.{int(time.time() * 1000) % 10**9}.{os.getpid()}"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    nk = img.GetSize()[2]
    paths = []
    iop = "\\".join(f"{v:.10f}" for v in (*direction[:, 0], *direction[:, 1]))
    for k in range(nk):
        if k in skip:
            continue
        sl = img[:, :, k]
        ipp = "\\".join(f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k)))
        for tag, value in [
            ("0008|0060", modality), ("0008|0016", "1.2.840.10008.5.1.4.1.1.2"), ("0008|0018", f"{uid}.{k + 1}"),
            ("0020|000d", f"{uid}.0"), ("0020|000e", uid), ("0008|103e", f"synthetic {modality}"),
            ("0020|0037", iop), ("0020|0032", ipp), ("0020|0013", str(k + 1)),
            ("0028|1052", "-1024"), ("0028|1053", "1"),
        ]:
            sl.SetMetaData(tag, value)
        name = folder / f"{(nk - 1 - k) if reverse_names else k:03d}.dcm"  # file order != position order
        writer.SetFileName(str(name))
        writer.Execute(sl)
        paths.append(name)
    return paths


def assert_same(volume: Volume, back: Volume, atol: float = 1e-4) -> None:
    assert back.array.dtype == volume.array.dtype
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.ijk_to_ras, volume.ijk_to_ras, atol=atol)


def assert_one_sentence(exc: BaseException, *needles: str) -> None:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text
    for needle in needles:
        assert needle in text, text


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_write_read_round_trip_keeps_voxels_dtype_and_oblique_geometry(tmp_path, suffix, dtype):
    volume = make_volume(dtype, direction=rotation(0.2, 0.5))
    out = write_volume(volume, tmp_path / f"vol{suffix}")
    assert out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    back = read_volume(out)
    assert_same(volume, back)
    assert back.metadata["shape_ijk"] == (12, 10, 9)
    np.testing.assert_allclose(back.metadata["spacing"], (0.8, 0.9, 2.5), atol=1e-5)
    assert back.metadata["format"] in {"nifti", "nrrd", "metaimage"}


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_files_written_by_simpleitk_read_with_ras_geometry(tmp_path, suffix):
    """Files from another writer (LPS convention done by hand here) come back in RAS."""
    volume = make_volume(np.int16, direction=rotation(-0.3, 2.0))
    path = tmp_path / f"x{suffix}"
    sitk.WriteImage(sitk_image(volume), str(path))
    back = read_volume(path)
    assert_same(volume, back)
    # A known voxel lands at the RAS point computed by hand.
    i, j, k = 3, 4, 5
    expected = volume.ijk_to_ras[:3, :3] @ [i, j, k] + volume.ijk_to_ras[:3, 3]
    lps = np.asarray(sitk.ReadImage(str(path)).TransformIndexToPhysicalPoint((i, j, k)))
    np.testing.assert_allclose(LPS @ lps, expected, atol=1e-4)
    np.testing.assert_allclose(back.ijk_to_ras_points([[i, j, k]])[0], expected, atol=1e-4)


def test_integer_sources_become_int16_or_float32_never_float64(tmp_path):
    base = make_volume(np.int16)
    big = Volume((base.array.astype(np.int32) * 20), base.ijk_to_ras)  # exceeds int16
    small = Volume(base.array.astype(np.int32), base.ijk_to_ras)
    f64 = Volume(base.array.astype(np.float64) / 3, base.ijk_to_ras)
    for name, vol in [("big", big), ("small", small), ("f64", f64)]:
        sitk.WriteImage(sitk_image(vol), str(tmp_path / f"{name}.nrrd"))
    back_big = read_volume(tmp_path / "big.nrrd")
    assert back_big.array.dtype == np.float32 and back_big.metadata["source_dtype"] == "int32"
    np.testing.assert_array_equal(back_big.array, big.array.astype(np.float32))
    back_small = read_volume(tmp_path / "small.nrrd")
    assert back_small.array.dtype == np.int16
    np.testing.assert_array_equal(back_small.array, base.array)
    back_f = read_volume(tmp_path / "f64.nrrd")
    assert back_f.array.dtype == np.float32
    np.testing.assert_allclose(back_f.array, f64.array.astype(np.float32), rtol=1e-6)


def test_dicom_series_round_trip_sorted_by_position_with_modality(tmp_path):
    volume = make_volume(np.int16, direction=rotation(0.0, 0.4))
    files = write_dicom_series(tmp_path / "series", volume)
    back = read_volume(tmp_path / "series")
    assert_same(volume, back)
    assert back.metadata["format"] == "dicom"
    assert back.metadata["modality"] == "CT"
    assert back.metadata["series_description"] == "synthetic CT"
    # One file of the series stands for the whole series.
    one = read_volume(files[4])
    assert_same(volume, one)


def test_dicom_file_without_extension_is_recognised(tmp_path):
    volume = make_volume(np.int16)
    files = write_dicom_series(tmp_path / "plain", volume)
    bare = files[3].with_suffix("")
    files[3].rename(bare)
    assert_same(volume, read_volume(bare))
    assert_same(volume, read_volume(tmp_path / "plain"))


def test_dicom_folder_with_two_series_picks_the_largest(tmp_path):
    big = make_volume(np.int16)
    small = make_volume(np.int16, shape_ijk=(12, 10, 4), origin=(0.0, 0.0, 500.0))
    write_dicom_series(tmp_path / "mixed", big, uid="1.2.3.4.5.1")
    folder = tmp_path / "mixed"
    other = write_dicom_series(tmp_path / "tmp_small", small, uid="1.2.3.4.5.2", modality="OT")
    for p in other:
        p.rename(folder / f"small_{p.name}")
    back = read_volume(folder)
    assert back.shape_ijk == (12, 10, 9)
    assert_same(big, back)


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    volume = make_volume(np.int16)
    write_dicom_series(tmp_path / "gap", volume, skip=(4,))
    with pytest.raises(InputError) as err:
        read_volume(tmp_path / "gap")
    assert_one_sentence(err.value, "gap", "missing, duplicate or unevenly spaced slices")


# ------------------------------------------------------------------ shared real data


def test_shared_files_load_with_right_geometry(real_ct):
    abdomen = read_volume(real_ct / "abdomen_ct_3mm.nii.gz")
    assert abdomen.shape_ijk == (122, 101, 112)
    assert abdomen.array.dtype == np.int16 and abdomen.metadata["source_dtype"] == "int32"
    np.testing.assert_allclose(abdomen.spacing, (3.0, 3.0, 3.0))
    assert (int(abdomen.array.min()), int(abdomen.array.max())) == (-1207, 3382)

    chest = read_volume(real_ct / "chest_ct_lung_mass.nii.gz")
    assert chest.shape_ijk == (256, 256, 64)
    np.testing.assert_allclose(chest.spacing, (1.68359375, 1.68359375, 5.0))

    cta = read_volume(real_ct / "chest_cta_mediastinum_crop.nii.gz")
    np.testing.assert_allclose(cta.spacing, (1.5, 1.5, 1.5))

    mr = read_volume(real_ct / "mr_not_ct.nii.gz")
    assert mr.shape_ijk == (117, 91, 20)


def test_shared_jpeg2000_dicom_series_loads(real_ct):
    folder = real_ct / "abdomen_ct_dicom"
    dicom = read_volume(folder)
    assert dicom.shape_ijk == (512, 512, 20)
    assert dicom.array.dtype == np.int16
    np.testing.assert_allclose(dicom.spacing, (0.9765625, 0.9765625, 2.0))
    assert dicom.metadata["modality"] == "CT"
    assert int(dicom.array.min()) == -1024  # rescale intercept applied: HU, not raw counts
    # RAS: LPS origin (-249.5, -437.5, -804.5) with identity direction.
    np.testing.assert_allclose(dicom.ijk_to_ras[:3, 3], (249.51171875, 437.51171875, -804.5))
    np.testing.assert_allclose(np.diag(dicom.ijk_to_ras)[:3], (-0.9765625, -0.9765625, 2.0))
    single = read_volume(folder / "slice_007.dcm")
    assert single.shape_ijk == (512, 512, 20)
    np.testing.assert_array_equal(single.array[::5, ::50, ::50], dicom.array[::5, ::50, ::50])
    # The slice that GDCM sorts first is the lowest along the slice normal.
    labels = read_volume(real_ct / "abdomen_ct_dicom_totalseg_labels.nii.gz")
    np.testing.assert_allclose(labels.ras_bounds()[0][2], dicom.ras_bounds()[0][2], atol=1e-3)


# ------------------------------------------------------------------ bad inputs


@pytest.fixture
def good_nifti(tmp_path) -> Path:
    return write_volume(make_volume(np.int16, shape_ijk=(40, 40, 20)), tmp_path / "good.nii.gz")


def test_missing_path(tmp_path):
    with pytest.raises(InputError) as err:
        read_volume(tmp_path / "nope.nii.gz")
    assert_one_sentence(err.value, "nope.nii.gz", "does not exist")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "scan.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(InputError) as err:
        read_volume(path)
    assert_one_sentence(err.value, "scan.png", "unsupported format")


@pytest.mark.parametrize("keep", [0.5, 0.9, 200])
def test_truncated_nii_gz_is_a_clean_sentence(good_nifti, tmp_path, keep):
    data = good_nifti.read_bytes()
    n = int(len(data) * keep) if keep < 1 else keep
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(data[:n])
    with pytest.raises(InputError) as err:
        read_volume(bad)
    assert_one_sentence(err.value, "cut.nii.gz")
    assert "truncated" in str(err.value) or "corrupt" in str(err.value)


def test_truncated_uncompressed_nii(tmp_path):
    path = write_volume(make_volume(np.int16, shape_ijk=(40, 40, 20)), tmp_path / "plain.nii")
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(InputError) as err:
        read_volume(path)
    assert_one_sentence(err.value, "plain.nii", "truncated")


def test_nii_gz_with_damaged_gzip_stream(good_nifti, tmp_path):
    data = bytearray(good_nifti.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    bad = tmp_path / "flipped.nii.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(InputError) as err:
        read_volume(bad)
    assert_one_sentence(err.value, "flipped.nii.gz")


@pytest.mark.parametrize("name", ["noise.nii.gz", "noise.nii", "noise.nrrd", "noise.mha", "empty.nrrd"])
def test_corrupt_bytes(tmp_path, name):
    rng = np.random.default_rng(0)
    path = tmp_path / name
    path.write_bytes(b"" if name.startswith("empty") else rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError) as err:
        read_volume(path)
    assert_one_sentence(err.value, name)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_truncated_nrrd_and_mha(tmp_path, suffix):
    path = write_volume(make_volume(np.int16, shape_ijk=(40, 40, 20)), tmp_path / f"t{suffix}")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError) as err:
        read_volume(path)
    assert_one_sentence(err.value, f"t{suffix}")


def test_2d_images_are_refused(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((30, 40), np.int16)), str(tmp_path / "flat.nii.gz"))
    one = make_volume(np.int16, shape_ijk=(30, 40, 1))
    sitk.WriteImage(sitk_image(one), str(tmp_path / "one.nrrd"))
    for name in ("flat.nii.gz", "one.nrrd"):
        with pytest.raises(InputError) as err:
            read_volume(tmp_path / name)
        assert_one_sentence(err.value, name, "2D")


def test_4d_and_vector_images_are_refused(tmp_path):
    four_d = sitk.GetImageFromArray(np.zeros((3, 10, 10, 10), np.int16), isVector=False)
    sitk.WriteImage(four_d, str(tmp_path / "time.nii.gz"))
    rgb = sitk.GetImageFromArray(np.zeros((10, 10, 10, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InputError) as err:
        read_volume(tmp_path / "time.nii.gz")
    assert_one_sentence(err.value, "time.nii.gz", "4D")
    with pytest.raises(InputError) as err:
        read_volume(tmp_path / "rgb.nrrd")
    assert_one_sentence(err.value, "rgb.nrrd", "3 values per voxel")


def test_4d_with_a_single_frame_is_read_as_3d(tmp_path):
    volume = make_volume(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(volume.array[None], isVector=False), str(tmp_path / "t1.nii.gz"))
    back = read_volume(tmp_path / "t1.nii.gz")
    np.testing.assert_array_equal(back.array, volume.array)


def test_folders_without_dicom_are_refused(tmp_path):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "readme.txt").write_text("not an image")
    for folder in (empty, other):
        with pytest.raises(InputError) as err:
            read_volume(folder)
        assert_one_sentence(err.value, folder.name, "no DICOM series")


def test_single_dicom_slice_is_2d(tmp_path):
    files = write_dicom_series(tmp_path / "lone", make_volume(np.int16, shape_ijk=(12, 10, 1)))
    with pytest.raises(InputError) as err:
        read_volume(files[0])
    assert_one_sentence(err.value, "2D")


# ------------------------------------------------------------------ atomic writes


def test_atomic_output_renames_on_success_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "sub" / "report.json"
    with atomic_output(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith("report.json") and tmp != target
        tmp.write_text("{}")
        assert not target.exists()  # invisible until the block succeeds
    assert target.read_text(encoding="utf-8") == "{}"

    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("cancelled")
    assert target.read_text(encoding="utf-8") == "{}"  # the old file is untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]

    with pytest.raises(MedAlignError), atomic_output(tmp_path / "never.txt"):
        pass
    assert not (tmp_path / "never.txt").exists()


def test_atomic_write_text(tmp_path):
    path = atomic_write_text(tmp_path / "a.csv", "x,y\n1,2\n")
    assert path.read_text(encoding="utf-8") == "x,y\n1,2\n"
    atomic_write_text(path, "replaced")
    assert path.read_text(encoding="utf-8") == "replaced"
    assert [p.name for p in tmp_path.iterdir()] == ["a.csv"]


def test_write_volume_failure_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", boom)
    with pytest.raises(MedAlignError):
        write_volume(make_volume(), tmp_path / "x.nii.gz")
    with pytest.raises(MedAlignError):
        write_volume(make_volume(), tmp_path / "x.nhdr")
    assert list(tmp_path.iterdir()) == []


def test_write_volume_refuses_unknown_suffix(tmp_path):
    with pytest.raises(InputError):
        write_volume(make_volume(), tmp_path / "x.png")


def test_nifti2_headers_are_understood(tmp_path):
    """NIfTI-2 (540-byte header, 64-bit dims): the completeness check reads its sizes, and a
    file ITK cannot decode still ends in one sentence."""
    import nibabel as nib

    from medalign.core.volume_io import _nifti_layout

    data = np.arange(20 * 20 * 10, dtype=np.int16).reshape(20, 20, 10)
    path = tmp_path / "n2.nii.gz"
    nib.save(nib.Nifti2Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), path)
    raw = gzip.decompress(path.read_bytes())
    assert _nifti_layout(raw[:540]).needed_bytes == len(raw) == 544 + data.nbytes
    cut = tmp_path / "n2cut.nii.gz"
    cut.write_bytes(gzip.compress(raw[:-500]))  # a complete gzip stream, but too little voxel data
    with pytest.raises(InputError) as err:
        read_volume(cut)
    assert_one_sentence(err.value, "n2cut.nii.gz", "truncated")
    try:
        assert read_volume(path).shape_ijk == (20, 20, 10)
    except InputError as exc:  # ITK builds without NIfTI-2 support refuse it cleanly
        assert_one_sentence(exc, "n2.nii.gz")


# ----------------------------------------------------------------- NaN / infinity in NIfTI (issue 22 item 4)


def _body_with(bad: float, where: tuple[int, int, int] | None, dtype=np.float32) -> np.ndarray:
    array = np.full((20, 24, 24), -1000.0, dtype)
    array[4:16, 6:18, 6:18] = 40.0
    if where is None:
        array[:] = bad
    else:
        array[where] = bad
    return array


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("bad, where, word", [
    (np.nan, (3, 3, 3), "NaN"), (np.inf, (19, 23, 23), "infinite"), (-np.inf, (0, 0, 0), "infinite"),
    (np.nan, None, "NaN"),
], ids=["one NaN", "+inf in the last voxel", "-inf in the first voxel", "all NaN"])
def test_nan_or_inf_in_a_nifti_is_refused_in_one_sentence(tmp_path, suffix, bad, where, word):
    """ITK's NIfTI reader turns NaN and infinity into 0, so the checks after reading never saw
    them (an all-NaN file got "the same value (0) in every voxel")."""
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(_body_with(bad, where)), str(path))
    with pytest.raises(InputError) as err:
        read_volume(path)
    message = str(err.value)
    assert f"contains {word} voxel values" in message and "ct" in message and "\n" not in message
    assert "same value" not in message


def test_float64_big_endian_nifti_with_nan_is_refused(tmp_path):
    import nibabel as nib

    array = _body_with(np.nan, (5, 6, 7), np.float64).transpose(2, 1, 0).astype(">f8")
    path = tmp_path / "be.nii"
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    with pytest.raises(InputError, match="contains NaN voxel values"):
        read_volume(path)


def test_finite_float_nifti_still_reads(tmp_path):
    path = tmp_path / "ok.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(_body_with(0.0, (1, 1, 1))), str(path))
    assert read_volume(path).array.dtype == np.float32


def test_cli_refuses_an_all_nan_nifti_with_exit_2(tmp_path, capsys):
    from medalign.cli import main

    path = tmp_path / "allnan.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(_body_with(np.nan, None)), str(path))
    assert main(["screen", str(path), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medalign: error: allnan.nii.gz contains NaN voxel values") and err.count("\n") == 1


# ----------------------------------------------------------------- names that are not UTF-8 (issue 22 item 7)

BAD = os.fsdecode(b"scan\xff\xfe")  # Latin-1 bytes from an old archive; Python keeps them as surrogates


def _in_child(code: str) -> subprocess.CompletedProcess:
    """ITK aborts the process on such names (exit 134), so the read runs in a child."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "SlicerMedAlign")})


@pytest.mark.skipif(sys.platform == "win32", reason="Windows file names are UTF-16: no undecodable bytes")
def test_nifti_with_a_non_utf8_name_is_read_through_a_link(tmp_path):
    volume = make_volume(np.int16)
    path = write_volume(volume, tmp_path / "plain.nii.gz").rename(tmp_path / (BAD + ".nii.gz"))
    proc = _in_child(
        "import os, sys, json; from medalign.core.volume_io import read_volume; "
        f"v = read_volume(os.fsdecode({os.fsencode(path)!r})); print(json.dumps([v.shape_ijk, v.metadata['path']]))"
    )
    assert proc.returncode == 0, proc.stderr[-500:]
    shape, shown = json.loads(proc.stdout)
    assert tuple(shape) == volume.shape_ijk and shown.endswith("scan\\xff\\xfe.nii.gz")
    assert assert_same(volume, read_volume(path)) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing added beside the input


@pytest.mark.skipif(sys.platform == "win32", reason="Windows file names are UTF-16: no undecodable bytes")
def test_dicom_series_in_a_non_utf8_folder(tmp_path):
    volume = make_volume(np.int16, direction=rotation(0.0, 0.4))
    files = write_dicom_series(tmp_path / "series", volume)
    folder = (tmp_path / "series").rename(tmp_path / BAD)
    assert_same(volume, read_volume(folder))
    assert_same(volume, read_volume(folder / Path(files[3]).name))


@pytest.mark.skipif(sys.platform == "win32", reason="Windows file names are UTF-16: no undecodable bytes")
def test_cli_screens_a_non_utf8_name_without_aborting(tmp_path):
    from helpers import synthetic_ct

    path = write_volume(synthetic_ct(), tmp_path / "ct.nii.gz").rename(tmp_path / (BAD + ".nii.gz"))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "medalign.cli", "screen", os.fsencode(path), "--out", str(out),
                           "--findings", "Lung nodule", "--no-maps", "--device", "cpu"],
                          capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "SlicerMedAlign")})
    assert proc.returncode == 0, proc.stderr[-800:]
    assert b"scan\\xff\\xfe.nii.gz" in proc.stdout
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["input"]["path"].endswith("scan\\xff\\xfe.nii.gz")
