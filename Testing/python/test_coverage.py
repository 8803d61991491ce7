"""Coverage warnings: a chest CT gets none, an abdomen or a thin slab gets one sentence each."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from medalign.core.volume import Volume
from medalign.inference.coverage import coverage_warnings
from medalign.inference.preprocess import prepare
from medalign.models.profiles import DEMO
from medalign.synth.phantoms import make_phantom


@pytest.fixture(scope="module")
def chest() -> Volume:
    return make_phantom(7, spacing=(3.0, 3.0, 5.0)).volume


def _warnings(volume: Volume) -> list[str]:
    return coverage_warnings(prepare(volume, DEMO))


def test_a_chest_phantom_gets_no_warning(chest):
    assert _warnings(chest) == []


def test_a_scan_without_lung_is_called_out(chest):
    # the same body with its lungs filled with soft tissue: what an abdomen looks like to the HU test
    from scipy import ndimage

    hu = chest.array.astype(np.float32)
    for k in range(hu.shape[0]):  # air-dense regions of a slice that do not reach its border: the lungs
        lab, _ = ndimage.label(hu[k] < -300)
        outside = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        hu[k][(lab > 0) & ~np.isin(lab, outside)] = 40.0
    (warning,) = _warnings(dataclasses.replace(chest, array=hu))
    assert "show lung" in warning and "not be a chest CT" in warning


def test_a_thin_slab_is_called_out(chest):
    k = chest.array.shape[0] // 2  # 8 slices of 5 mm
    slab = Volume(chest.array[k - 4 : k + 4].copy(), chest.ijk_to_ras.copy())
    warnings = _warnings(slab)
    assert any("covers only 40 mm head to foot" in w for w in warnings), warnings


def test_an_empty_field_of_view_is_called_out(chest):
    air = dataclasses.replace(chest, array=np.full_like(chest.array, -1000.0))
    assert "almost no body" in _warnings(air)[0]


# measured on the demo model's grid; see medalign.inference.coverage
REAL_EXPECTED = {
    "chest_ct_lung_mass.nii.gz": [],
    "chest_cta_mediastinum_crop.nii.gz": [],
    "abdomen_ct_3mm.nii.gz": ["show lung"],
    "abdomen_ct_dicom": ["covers only"],  # upper-abdomen slab: its blankets and mattress are lung-dense
}


@pytest.mark.parametrize("name", sorted(REAL_EXPECTED))
def test_shared_real_scans(real_ct, name):
    from medalign.core.volume_io import read_volume

    warnings = _warnings(read_volume(real_ct / name))
    assert len(warnings) == len(REAL_EXPECTED[name]), warnings
    for text, warning in zip(REAL_EXPECTED[name], warnings):
        assert text in warning


def test_warnings_travel_with_the_result_and_are_printed(tmp_path):
    import io

    from medalign.cli.screen import print_table
    from medalign.inference.results import ScreeningResult

    result = ScreeningResult({"path": "ct.nii.gz"}, "m", "cpu", [], warnings=["Only 2% of the scan's slices show lung."])
    back = ScreeningResult.read(result.write(tmp_path))
    assert back.warnings == result.warnings
    stream = io.StringIO()
    print_table(back, stream)
    assert "warning: Only 2% of the scan's slices show lung." in stream.getvalue()
    # results written before warnings existed still read
    assert ScreeningResult.from_dict({"model": "m", "device": "cpu", "findings": []}).warnings == []
