"""The one hotspot rule (medalign.inference.hotspot): a map's positive peak and its region."""

from __future__ import annotations

import numpy as np
import pytest

from medalign.core.volume import Volume
from medalign.inference import screener
from medalign.inference.hotspot import hotspot_of, hotspot_region

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def _map(array: np.ndarray) -> Volume:
    return Volume(np.asarray(array, dtype=np.float32), AFFINE)


@pytest.mark.parametrize(
    "fill",
    [np.nan, 0.0, -0.5, np.inf, -np.inf],
    ids=["all NaN", "all zero", "all negative", "all +inf", "all -inf"],
)
def test_a_map_with_no_positive_finite_value_has_no_hotspot(fill):
    # Before the one rule, a zero or negative map got a "hotspot" at voxel (0, 0, 0)
    # whose region was the whole map (litres).
    array = np.full((6, 7, 8), fill, dtype=np.float32)
    assert hotspot_of(_map(array)) is None
    assert hotspot_region(array) is None


def test_negative_map_with_nan_holes_has_no_hotspot():
    array = np.linspace(-3.0, -0.1, 6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)
    array[0, 0, 0] = np.nan
    assert hotspot_of(_map(array)) is None


def test_nan_and_inf_voxels_are_neither_peak_nor_region():
    array = np.zeros((10, 10, 10), np.float32)
    array[4:7, 4:7, 4:7] = 1.0
    array[5, 5, 6] = 2.0
    array[0, 0, 0] = np.nan
    array[9, 9, 9] = np.inf
    array[4, 4, 7] = np.nan  # a hole next to the region stays out of it
    h = hotspot_of(_map(array))
    assert h is not None and h.value == 2.0 and h.threshold == 1.0
    assert h.ras == pytest.approx((12.0, 10.0, 15.0))
    assert h.extent_mm3 == pytest.approx(27 * 2 * 2 * 3)


def test_region_is_the_connected_part_around_the_peak():
    array = np.zeros((10, 10, 10), np.float32)
    array[1:3, 1:3, 1:3] = 0.9  # above half the peak but not connected to it
    array[6:8, 6:8, 6:8] = 0.8
    array[7, 7, 7] = 1.0
    region = hotspot_region(array)
    assert region is not None and region.index_kji == (7, 7, 7) and region.threshold == 0.5
    assert int(region.mask.sum()) == 8 and not region.mask[1, 1, 1]


def test_explicit_threshold_above_the_peak_keeps_the_peak():
    array = np.zeros((5, 5, 5), np.float32)
    array[2, 2, 2] = 1.0
    region = hotspot_region(array, threshold=3.0)
    assert region is not None and region.threshold == 1.0 and int(region.mask.sum()) == 1
    wide = hotspot_region(array, threshold=-1.0)
    assert wide is not None and int(wide.mask.sum()) == array.size


def test_screener_uses_the_one_rule():
    assert screener.hotspot_of is hotspot_of


def test_a_map_without_hotspot_misses_the_pointing_game():
    """Evaluation must not drop such a case (that would flatter the pointing game)."""
    from medalign.evaluation.evaluate import localization

    array = -np.ones((10, 10, 10), np.float32)
    array[2:4, 2:4, 2:4] = -0.1  # highest where the lesion is, but nowhere positive
    lesion = np.zeros((10, 10, 10), bool)
    lesion[2:4, 2:4, 2:4] = True
    assert hotspot_of(_map(array)) is None
    result = localization(_map(array), None, _map(lesion.astype(np.float32)), lesion, tolerance_mm=5.0)
    assert result["hit"] is False and result["hit_tolerant"] is False
    assert result["voxel_auc"] > 0.9
