"""Volume I/O: NIfTI, NRRD, MetaImage and DICOM series into ``Volume``, and back (atomically).

SimpleITK (ITK + GDCM) reads every format, so JPEG 2000 DICOM, gzip NIfTI and detached
NRRD headers all follow one code path. ITK works in LPS; ``Volume`` is RAS like Slicer,
so the geometry is flipped once here and nowhere else. Every failure becomes an
``InputError`` with one sentence naming the file, never an ITK traceback.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medalign.core.atomic import atomic_output, publish, temp_name
from medalign.core.errors import InputError, MedAlignError
from medalign.core.memory import check_volume_fits
from medalign.core.volume import Volume

__all__ = ["read_volume", "write_volume", "SUPPORTED_SUFFIXES", "VOLUME_SUFFIXES", "strip_volume_suffix"]

_LPS_RAS = np.diag([-1.0, -1.0, 1.0])

# suffix -> format name; longest suffixes first so ".nii.gz" wins over ".gz".
_FORMATS: dict[str, str] = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "metaimage",
    ".mhd": "metaimage",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".ima": "dicom",
}
SUPPORTED_SUFFIXES: tuple[str, ...] = tuple(_FORMATS)
_WRITABLE = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_DETACHED = (".nhdr", ".mhd")  # header + separate data file
# Files that hold a whole CT volume on their own (a cohort folder lists these and DICOM folders).
VOLUME_SUFFIXES: tuple[str, ...] = _WRITABLE


def strip_volume_suffix(name: str) -> str:
    """A case id from a file name: only a known volume suffix is cut, so the dots of a DICOM
    UID ("1.2.840.1.nii.gz" -> "1.2.840.1") and of folder names survive."""
    lower = name.lower()
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name

# A series whose slice positions deviate by more than this fraction of the slice
# spacing has missing slices: its geometry would be silently wrong, so it is refused.
_MAX_SLICE_DEVIATION = 0.1

_INT_TYPES = {
    sitk.sitkInt8, sitk.sitkUInt8, sitk.sitkInt16, sitk.sitkUInt16,
    sitk.sitkInt32, sitk.sitkUInt32, sitk.sitkInt64, sitk.sitkUInt64,
}


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in _FORMATS:
        if name.endswith(suffix):
            return suffix
    return "".join(path.suffixes[-2:]).lower() or path.suffix.lower()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- reading


def read_volume(path: str | Path) -> Volume:
    """Read a CT from a file or a DICOM series folder into a RAS ``Volume``.

    Integer sources stay int16 when their values fit (half the memory of float32 and
    exactly what Slicer holds); anything else becomes float32, never float64. DICOM
    rescale slope/intercept are applied by GDCM, so values are Hounsfield units.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path} does not exist.")
    # ITK prints its own warnings (e.g. "No Series were found") to stderr; every problem
    # that matters becomes an InputError here, so they are muted while reading.
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        with _itk_readable(path) as readable:
            volume = _read(readable)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)
    if readable != path:
        volume.metadata["path"] = _printable(path)
    return volume


def _printable(path: Path) -> str:
    """``path`` as text that can be printed and stored in JSON: bytes that are not UTF-8
    (kept by Python as lone surrogates) become ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_utf8(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@contextlib.contextmanager
def _itk_readable(path: Path) -> Iterator[Path]:
    """A path ITK can open for ``path``.

    ITK aborts the whole process (exit 134, no message) on a path whose bytes are not
    UTF-8.  Such an input is read through a symbolic link with a printable name in a
    private temporary folder: to the file's folder when only a folder name is the
    problem (DICOM siblings and detached data files stay reachable), else to the input
    itself.  The input is never copied or changed.
    """
    if _is_utf8(path):
        yield path
        return
    absolute = Path(os.path.abspath(path))
    if absolute.is_file() and _is_utf8(Path(absolute.name)):
        source, inner = absolute.parent, absolute.name
    else:
        source, inner = absolute, None
    folder = Path(tempfile.mkdtemp(prefix="medalign-read-"))
    try:
        link = folder / (_printable(Path(source.name)) or "input")
        try:
            link.symlink_to(source, target_is_directory=source.is_dir())
        except OSError:
            raise InputError(
                f"{_printable(path)} has a name that is not valid UTF-8 and no link to it could be made; "
                "rename it with plain characters."
            ) from None
        yield link / inner if inner else link
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _read(path: Path) -> Volume:
    if path.is_dir():
        return _read_dicom_folder(path)
    suffix = _suffix(path)
    fmt = _FORMATS.get(suffix)
    if fmt is None:
        if _looks_like_dicom(path):
            fmt = "dicom"
        else:
            raise InputError(
                f"{path.name} has an unsupported format ({suffix or 'no extension'}); "
                "use NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr), MetaImage (.mha/.mhd) or a DICOM series folder."
            )
    if fmt == "dicom":
        return _read_dicom_file(path)
    if path.stat().st_size == 0:
        raise InputError(f"{path.name} is empty (0 bytes).")
    if fmt == "nifti":
        # ITK zero-fills a truncated NIfTI silently, so completeness is checked first.
        _check_nifti_complete(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    _read_information(reader, path)
    image = _execute(reader, path)
    return _to_volume(image, path, fmt, modality=None, description=None)


def _looks_like_dicom(path: Path) -> bool:
    """DICOM files often have no extension; the 'DICM' magic at byte 128 identifies them."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _read_information(reader: sitk.ImageFileReader, path: Path) -> None:
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"{path.name} is corrupt or not a readable image file.") from None
    _check_shape(reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(), path)
    check_volume_fits(path.name, reader.GetSize(), floating=reader.GetPixelID() not in _INT_TYPES)


def _execute(reader: sitk.ImageFileReader | sitk.ImageSeriesReader, path: Path) -> sitk.Image:
    """Run a reader, asking for float32 up front when the source is floating point."""
    try:
        if isinstance(reader, sitk.ImageFileReader) and reader.GetPixelID() not in _INT_TYPES:
            reader.SetOutputPixelType(sitk.sitkFloat32)
        image = reader.Execute()
    except RuntimeError:
        raise InputError(f"{path.name} is corrupt or truncated and could not be read.") from None
    _check_shape(image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel(), path)
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    return image


def _check_shape(dim: int, size: tuple[int, ...], components: int, path: Path) -> None:
    if components != 1:
        raise InputError(
            f"{path.name} has {components} values per voxel (a colour or vector image), not a grey-scale CT."
        )
    if dim < 3 or (dim == 3 and min(size) == 1):
        raise InputError(f"{path.name} is a 2D image ({'x'.join(map(str, size))}); MedAlign needs a 3D CT volume.")
    if dim > 4 or (dim == 4 and size[3] != 1):
        raise InputError(
            f"{path.name} is a {dim}D image ({'x'.join(map(str, size))}), e.g. a time series; "
            "MedAlign needs a single 3D CT volume."
        )


@dataclass(frozen=True)
class _NiftiLayout:
    """Where a NIfTI-1/2 file's voxels are and how they are stored, from its header."""

    offset: int
    shape: tuple[int, ...]
    bitpix: int
    datatype: int
    byteorder: str  # "<" or ">"

    @property
    def count(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def needed_bytes(self) -> int:
        return self.offset + self.count * self.bitpix // 8


# NIfTI datatype codes of real floating-point voxels (the only ones that can hold NaN/inf).
_NIFTI_FLOATS = {16: "f4", 64: "f8"}
_CHUNK = 1 << 22


def _open_nifti(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _check_nifti_complete(path: Path) -> None:
    """Refuse a NIfTI whose voxel data is cut short (ITK would pad it with zeros) or holds
    NaN/infinity (ITK's NIfTI reader silently turns those into 0, so no later check could see them)."""
    gz = path.name.lower().endswith(".gz")
    try:
        with _open_nifti(path) as fh:
            head = fh.read(540)
    except (OSError, EOFError, zlib.error):
        raise InputError(f"{path.name} is corrupt or truncated (its gzip stream is damaged).") from None
    layout = _nifti_layout(head)
    if layout is None:
        return  # not a NIfTI header we understand; ITK will judge it
    check_volume_fits(path.name, layout.shape, floating=layout.datatype in _NIFTI_FLOATS)  # before any decoding
    needed = layout.needed_bytes
    if layout.datatype in _NIFTI_FLOATS:
        total = _scan_nifti_floats(path, layout)  # one pass: completeness and finiteness
    elif not gz:
        total = path.stat().st_size
    else:
        # A gzip trailer stores the uncompressed length mod 2**32: if it matches, the stream
        # is complete and we avoid decompressing twice. Otherwise count what really decodes.
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            (isize,) = struct.unpack("<I", fh.read(4))
        total = needed if isize == needed % 2**32 else _decoded_length(path)
    if total < needed:
        raise InputError(f"{path.name} is truncated: it holds {total} of the {needed} bytes its header announces.")


def _decoded_length(path: Path) -> int:
    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                total += len(chunk)
    except (OSError, EOFError, zlib.error):
        raise InputError(f"{path.name} is corrupt or truncated (its gzip stream ends early or is damaged).") from None
    return total


def _scan_nifti_floats(path: Path, layout: _NiftiLayout) -> int:
    """Bytes the file holds (header included); raises on the first NaN or infinite voxel.

    Costs one more decompression pass, only for floating-point NIfTI (integer CTs, the
    usual kind, cannot hold NaN): measured 16 s for a 256x512x512 float32 noise volume
    whose whole read then took 33 s; gzip, not ``np.isfinite``, is the cost.
    """
    dtype = np.dtype(layout.byteorder + _NIFTI_FLOATS[layout.datatype])
    end = layout.needed_bytes
    pos, carry = 0, b""
    try:
        with _open_nifti(path) as fh:
            while chunk := fh.read(_CHUNK):
                lo = min(len(chunk), max(0, layout.offset - pos))  # the voxel bytes in this chunk
                hi = max(lo, min(len(chunk), end - pos))
                pos += len(chunk)
                data = carry + chunk[lo:hi]
                usable = len(data) - len(data) % dtype.itemsize
                values, carry = np.frombuffer(data[:usable], dtype=dtype), data[usable:]
                if not np.isfinite(values).all():
                    bad = "NaN" if np.isnan(values).any() else "infinite"
                    raise InputError(
                        f"{path.name} contains {bad} voxel values, so it cannot be screened "
                        "(fill them with a value in Hounsfield units, e.g. -1024 for air, and save it again)."
                    )
    except (OSError, EOFError, zlib.error):
        raise InputError(f"{path.name} is corrupt or truncated (its gzip stream ends early or is damaged).") from None
    return pos


def _nifti_layout(head: bytes) -> _NiftiLayout | None:
    """The voxel layout a NIfTI-1/2 header announces; None when it is not one we understand."""
    if len(head) < 348:
        return None
    for order in "<>":
        (sizeof_hdr,) = struct.unpack(order + "i", head[:4])
        if sizeof_hdr == 348:
            dims = struct.unpack(order + "8h", head[40:56])
            (datatype, bitpix) = struct.unpack(order + "2h", head[70:74])
            (vox_offset,) = struct.unpack(order + "f", head[108:112])
            break
        if sizeof_hdr == 540 and len(head) >= 540:
            (datatype, bitpix) = struct.unpack(order + "2h", head[12:16])
            dims = struct.unpack(order + "8q", head[16:80])
            (vox_offset,) = struct.unpack(order + "q", head[168:176])
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    shape = tuple(max(int(d), 1) for d in dims[1 : ndim + 1])
    return _NiftiLayout(offset=int(vox_offset), shape=shape, bitpix=int(bitpix), datatype=int(datatype), byteorder=order)


def _read_dicom_file(path: Path) -> Volume:
    """A single DICOM file stands for its whole series: load every slice beside it."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"{path.name} is corrupt or not a readable DICOM file.") from None
    files = _series_containing(path)
    if len(files) <= 1:
        # A lone file: an enhanced (multi-frame) DICOM is 3D on its own, a single slice is 2D.
        _check_shape(reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(), path)
        check_volume_fits(path.name, reader.GetSize(), floating=reader.GetPixelID() not in _INT_TYPES)
        image = _execute(reader, path)
        return _to_volume(image, path, "dicom", _meta(reader, "0008|0060"), _meta(reader, "0008|103e"))
    return _read_series(files, path.parent)


def _series_containing(path: Path) -> list[str]:
    """The GDCM-sorted file list of the series that holds ``path`` (matched by file, since
    anonymised data may blank the Series Instance UID that GDCM groups by)."""
    target = path.resolve()
    try:
        ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path.parent)))
    except RuntimeError:
        return []
    for sid in ids:
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path.parent), sid))
        if any(Path(f).resolve() == target for f in files):
            return files
    return []


def _read_dicom_folder(folder: Path) -> Volume:
    try:
        ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        ids = []
    series = []
    for sid in ids:
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid))
        if files:
            series.append(files)
    if not series:
        raise InputError(f"The folder {folder} contains no DICOM series (only files directly inside it are searched).")
    # Folders often mix a scout or a dose report with the CT: the largest series is the CT.
    files = max(series, key=len)
    if len(files) == 1:
        return _read_dicom_file(Path(files[0]))
    return _read_series(files, folder)


def _read_series(files: list[str], where: Path) -> Volume:
    """Read a sorted slice list (GDCM sorts by image position along the slice normal)."""
    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    try:
        first.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"The DICOM series in {where} is corrupt ({Path(files[0]).name} cannot be read).") from None
    if first.GetNumberOfComponents() != 1:
        raise InputError(f"The DICOM series in {where} is a colour image, not a grey-scale CT.")
    rows_columns = first.GetSize()[:2]
    check_volume_fits(f"The DICOM series in {where.name}", (*rows_columns, len(files)),
                      floating=first.GetPixelID() not in _INT_TYPES)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    if first.GetPixelID() not in _INT_TYPES:
        reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError:
        raise InputError(f"The DICOM series in {where} is corrupt or truncated and could not be read.") from None
    _check_shape(image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel(), where)
    deviation, step = _slice_spacing_deviation(reader, image, len(files))
    if deviation > _MAX_SLICE_DEVIATION * step:
        raise InputError(
            f"The DICOM series in {where} has missing, duplicate or unevenly spaced slices "
            f"(positions deviate by up to {deviation:.2f} mm from a {step:.2f} mm step), "
            "so its geometry cannot be trusted."
        )

    def tag(key: str) -> str | None:
        return reader.GetMetaData(0, key).strip() if reader.HasMetaDataKey(0, key) else None

    volume = _to_volume(image, where, "dicom", tag("0008|0060"), tag("0008|103e"))
    volume.metadata["num_files"] = len(files)
    return volume


def _slice_spacing_deviation(reader: sitk.ImageSeriesReader, image: sitk.Image, count: int) -> tuple[float, float]:
    """Largest deviation (mm) of the slice positions from an even step, and that step.

    ITK builds the geometry from the first and last slice only, so a missing slice would
    silently stretch the volume; the per-file Image Position tags reveal it.
    """
    normal = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    heights = []
    for n in range(count):
        if not reader.HasMetaDataKey(n, "0020|0032"):
            return 0.0, 1.0  # no positions to compare (ITK then used the nominal spacing)
        try:
            position = [float(v) for v in reader.GetMetaData(n, "0020|0032").split("\\")]
        except ValueError:
            return 0.0, 1.0
        heights.append(float(np.dot(position[:3], normal)))
    heights = np.sort(np.asarray(heights))
    if heights.size < 2:
        return 0.0, 1.0
    step = (heights[-1] - heights[0]) / (heights.size - 1)
    if step <= 0:
        return float("inf"), 0.0
    return float(np.max(np.abs(np.diff(heights) - step))), float(step)


def _meta(reader: sitk.ImageFileReader, key: str) -> str | None:
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else None


def _to_volume(image: sitk.Image, path: Path, fmt: str, modality: str | None, description: str | None) -> Volume:
    source_dtype = np.dtype(sitk.GetArrayViewFromImage(image).dtype).name if image.GetNumberOfPixels() else "?"
    if image.GetPixelID() in _INT_TYPES:
        stats = sitk.MinimumMaximumImageFilter()
        stats.Execute(image)
        fits = -32768 <= stats.GetMinimum() and stats.GetMaximum() <= 32767
        target = sitk.sitkInt16 if fits else sitk.sitkFloat32
    else:
        target = sitk.sitkFloat32
    if image.GetPixelID() != target:
        image = sitk.Cast(image, target)
    array = sitk.GetArrayFromImage(image)  # [k, j, i], owns its memory
    volume = Volume(array=array, ijk_to_ras=_ijk_to_ras(image))
    volume.metadata.update(
        path=str(path),
        format=fmt,
        modality=modality or None,
        series_description=description or None,
        source_dtype=source_dtype,
        shape_ijk=volume.shape_ijk,
        spacing=volume.spacing,
    )
    return volume


def _ijk_to_ras(image: sitk.Image) -> np.ndarray:
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    matrix = np.eye(4)
    matrix[:3, :3] = _LPS_RAS @ direction @ np.diag(spacing)
    matrix[:3, 3] = _LPS_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    return matrix


# --------------------------------------------------------------------------- writing


def write_volume(volume: Volume, path: str | Path, compress: bool | None = None) -> Path:
    """Write a ``Volume`` (RAS) as NIfTI, NRRD or MetaImage, atomically, keeping its dtype.

    ``compress=None`` gzips every format but ``.nii``; ``False`` writes raw voxels: right for a
    hand-off file that is read once (gzip costs seconds on a large CT).
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in _WRITABLE:
        raise InputError(
            f"Cannot write {path.name}: use .nii.gz, .nii, .nrrd, .nhdr, .mha or .mhd."
        )
    image = _to_image(volume)
    if compress is None:
        compress = suffix != ".nii"
    if suffix not in _DETACHED:
        with atomic_output(path) as tmp:
            _write_image(image, tmp, compress)
        return path
    # Header + data file: write both in a temp folder under their final names (the header
    # refers to the data file by name), then move the data first and the header last.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = temp_name(path)
    tmpdir.mkdir()
    try:
        _write_image(image, tmpdir / path.name, compress)
        produced = sorted(tmpdir.iterdir(), key=lambda p: p.name == path.name)
        for item in produced:
            publish(item, path.parent / item.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def _write_image(image: sitk.Image, path: Path, compress: bool) -> None:
    try:
        sitk.WriteImage(image, str(path), compress)
    except RuntimeError as exc:
        raise MedAlignError(f"Could not write {path.name}: {_one_line(str(exc).splitlines()[-1])}") from None


def _to_image(volume: Volume) -> sitk.Image:
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise InputError(f"Cannot write a volume with a {array.ndim}D array; it must be [k, j, i].")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    lps = _LPS_RAS @ volume.ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    if np.any(spacing <= 0):
        raise InputError("Cannot write a volume whose ijk_to_ras has a zero-length axis.")
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(v) for v in (lps / spacing).ravel()))
    image.SetOrigin(tuple(float(v) for v in _LPS_RAS @ volume.ijk_to_ras[:3, 3]))
    return image
