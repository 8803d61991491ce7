"""The textbook nodule detector behind Testing/benchmarks/nodule_shape_oracle.py: its figure
stands in the model card as the reference for the demo model's lung-nodule score, so it
must pick a round nodule in aerated lung over a vessel and over the lung's wall."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SPACING = np.array([1.5, 1.5, 1.5])


def _oracle():
    spec = importlib.util.spec_from_file_location("nodule_shape_oracle", REPO / "Testing/benchmarks/nodule_shape_oracle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _chest(nodule: bool) -> tuple[np.ndarray, np.ndarray]:
    """Air around a soft-tissue body holding one aerated lung, a 5 mm vessel across it and,
    if asked, a 16 mm solid nodule; returns (HU, nodule voxels)."""
    hu = np.full((60, 60, 60), -1000.0, dtype=np.float32)
    hu[4:56, 4:56, 4:56] = 40.0
    hu[10:50, 10:50, 10:50] = -850.0
    k, j, i = np.indices(hu.shape) * SPACING[:, None, None, None]
    vessel = ((k - 30 * 1.5) ** 2 + (j - 18 * 1.5) ** 2 <= 2.5**2) & (i > 10 * 1.5) & (i < 50 * 1.5)
    hu[vessel] = 40.0
    sphere = (k - 30 * 1.5) ** 2 + (j - 38 * 1.5) ** 2 + (i - 30 * 1.5) ** 2 <= 8.0**2
    if nodule:
        hu[sphere] = 40.0
    return hu, sphere


def test_the_detector_picks_the_nodule_and_ignores_the_vessel():
    oracle = _oracle()
    hu, sphere = _chest(nodule=True)
    score, box, inside = oracle.best_candidate(hu, SPACING, radius_mm=4.0, solid_hu=-450.0, min_air=0.5)
    assert score > 0 and box is not None
    found = np.zeros(hu.shape, dtype=bool)
    found[box] = inside
    assert (found & sphere).sum() > 0.8 * found.sum()  # the candidate is the nodule, not the vessel

    hu, _ = _chest(nodule=False)
    score_without, box, _ = oracle.best_candidate(hu, SPACING, radius_mm=4.0, solid_hu=-450.0, min_air=0.5)
    assert score_without == 0.0 and box is None  # the opening erased the vessel; the wall is no candidate
