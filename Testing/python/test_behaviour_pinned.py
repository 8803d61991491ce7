"""Moving code must not change what it computes.

A phantom's voxels and the demo model's probabilities on it were recorded before the
engine was split into layers (commit after ded047f); any later restructuring has to
reproduce them. A change that means to alter either updates these numbers on purpose.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from medalign.synth.phantoms import make_phantom

PHANTOM_SEED = 7
PHANTOM_SHAPE = (84, 233, 294)
PHANTOM_SHA256 = "2488ed72ba5f1557e2400b51133b844353191777da0c87850c68a73e0a2c557b"
DEMO_PROBABILITIES = {
    "Medical material": 0.350193,
    "Arterial wall calcification": 0.303477,
    "Cardiomegaly": 0.005477,
    "Pericardial effusion": 0.992779,
    "Coronary artery wall calcification": 0.41054,
    "Hiatal hernia": 0.031851,
    "Lymphadenopathy": 0.234911,
    "Emphysema": 0.029018,
    "Atelectasis": 0.425326,
    "Lung nodule": 0.253614,
    "Lung opacity": 0.012027,
    "Pulmonary fibrotic sequela": 0.276852,
    "Pleural effusion": 0.917358,
    "Mosaic attenuation pattern": 0.039831,
    "Peribronchial thickening": 0.050595,
    "Consolidation": 0.024667,
    "Bronchiectasis": 0.054084,
    "Interlobular septal thickening": 0.042144,
}


@pytest.fixture(scope="module")
def phantom_volume():
    return make_phantom(seed=PHANTOM_SEED).volume


def test_phantom_voxels_are_unchanged(phantom_volume):
    voxels = np.ascontiguousarray(phantom_volume.array)
    assert voxels.shape == PHANTOM_SHAPE and voxels.dtype == np.int16
    assert hashlib.sha256(voxels.tobytes()).hexdigest() == PHANTOM_SHA256


def test_demo_model_outputs_are_unchanged(phantom_volume):
    from medalign import screen

    result = screen(phantom_volume, device="cpu", with_maps=False)
    got = {f.name: f.probability for f in result.findings}
    assert got.keys() == DEMO_PROBABILITIES.keys()
    for name, expected in DEMO_PROBABILITIES.items():
        assert got[name] == pytest.approx(expected, abs=2e-4), name
