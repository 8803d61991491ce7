"""Memory guard (issue 22 item 5): a volume that cannot fit is refused from its header,
before decoding, in one sentence with the estimate and what is available."""

from __future__ import annotations

import gzip
import struct
import time

import pytest

from medalign.core import memory
from medalign.core.errors import InputError
from medalign.core.volume_io import read_volume

HUGE = (4096, 4096, 4096)  # 69 G voxels: about 1.5 TB to screen, more than any test machine has


def _nifti_header(shape: tuple[int, int, int], datatype: int = 4, bitpix: int = 16) -> bytes:
    """A NIfTI-1 header (int16 by default) announcing ``shape``, followed by no voxel data."""
    head = bytearray(352)
    struct.pack_into("<i", head, 0, 348)
    struct.pack_into("<8h", head, 40, 3, *shape, 1, 1, 1, 1)
    struct.pack_into("<2h", head, 70, datatype, bitpix)
    struct.pack_into("<8f", head, 76, 1.0, 1.0, 1.0, 1.0, 0, 0, 0, 0)
    struct.pack_into("<f", head, 108, 352.0)
    struct.pack_into("<f", head, 112, 1.0)  # scl_slope
    struct.pack_into("<h", head, 252, 1)  # qform_code
    head[344:348] = b"n+1\0"
    return bytes(head)


@pytest.mark.parametrize("datatype, bitpix", [(4, 16), (16, 32)], ids=["int16", "float32"])
def test_a_huge_nifti_is_refused_from_its_header_in_one_sentence(tmp_path, datatype, bitpix):
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(_nifti_header(HUGE, datatype, bitpix) + bytes(1 << 20)))
    start = time.perf_counter()
    with pytest.raises(InputError) as err:
        read_volume(path)
    assert time.perf_counter() - start < 5  # nothing was decoded
    message = str(err.value)
    assert message.startswith("bomb.nii.gz is 4096x4096x4096 voxels; screening it needs about ")
    assert " GB of memory but only " in message and "is available" in message and "\n" not in message


def test_a_huge_nrrd_is_refused_from_its_header(tmp_path):
    (tmp_path / "data.raw").write_bytes(bytes(1024))
    header = tmp_path / "big.nhdr"
    header.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 4096 4096 4096\nspacings: 1 1 1\n"
                      "encoding: raw\nendian: little\ndata file: data.raw\n", encoding="ascii")
    with pytest.raises(InputError, match=r"big.nhdr is 4096x4096x4096 voxels; screening it needs about \d"):
        read_volume(header)


def test_the_cli_refuses_it_with_exit_2(tmp_path, capsys):
    from medalign.cli import main

    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(_nifti_header(HUGE)))
    assert main(["screen", str(path), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medalign: error: bomb.nii.gz is 4096x4096x4096 voxels") and err.count("\n") == 1


def test_estimate_follows_the_measured_rule_and_small_volumes_pass():
    assert memory.screening_bytes(1000, floating=False) == 1000 * memory.BYTES_PER_VOXEL
    assert memory.screening_bytes(1000, floating=True) == 1000 * (memory.BYTES_PER_VOXEL + memory.FLOAT_EXTRA_BYTES_PER_VOXEL)
    free = memory.available_bytes()
    assert free is None or free > 0
    memory.check_volume_fits("small.nii.gz", (64, 64, 64), floating=True)  # no error


def test_opting_out_skips_the_guard(tmp_path, monkeypatch):
    monkeypatch.setenv(memory.OPT_OUT, "off")
    memory.check_volume_fits("x.nii.gz", HUGE, floating=False)
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(_nifti_header((64, 64, 64))))
    with pytest.raises(InputError, match="truncated"):  # the next check still runs
        read_volume(path)


def test_no_memory_figure_refuses_nothing(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: None)
    memory.check_volume_fits("x.nii.gz", HUGE, floating=False)
