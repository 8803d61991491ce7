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


# SHA-256 of (voxels, mask, report) of more phantoms, recorded before synth/ was split into
# one module per finding: seeds 0-2 as drawn, and seed 7 with every finding forced on
# (every painter and every report sentence runs, each from its own random stream).
MORE_PHANTOMS = {
    (0, False): ("7d22e079b2a539624717b4d174a5c01b49d8cce111e15c35722580318bb86c00",
                 "e1eecdf45cd0f5ad83aa74026d62d6ddd8e8d34801a0472e29ea380cd77efe3c",
                 "a6d21e505c526dc49b948895c69947d5883218a1e2b54243644adcd0934d0310"),
    (1, False): ("8cf791869468d461462bf5c7d137baab1f710ff21711297d7614ccea574d7868",
                 "4324f3250136ab03d5191d5153a4ffc5c5b4b3e790061ef08ca27a293452b7d5",
                 "624e9477908d47440023005a7291856a4f4ee8513f4d3e89fcedd958cbc35d6c"),
    (2, False): ("7e81ce94c9ade00351ae92be01eaa873cc6bcd0d5c52b56ee7072ddf79706665",
                 "96745b1133fc2e0f68d926e75daf418a2172ca5038dcc21f73cd83ccea78cd90",
                 "6127693be52f4fd56382cfeef8b831dd1387a164493f91827b7ac464ea2af9bf"),
    (7, True): ("baad040e9af6697c9d89a28246adcc127f026d0b48b77e52279160e2a62e70c5",
                "74953fed392bc334b9767e2f751013c9ce81a571d9a3c5dd23a0eea199e77216",
                "78f3462404a2ea2c165df4e9d4454235df3a38886a68fc5fc4805a211afa3689"),
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


@pytest.mark.parametrize(("seed", "all_findings"), list(MORE_PHANTOMS))
def test_more_phantoms_are_unchanged(seed, all_findings):
    from medalign.knowledge.findings import CT_RATE_FINDINGS

    ph = make_phantom(seed=seed, labels={name: 1 for name in CT_RATE_FINDINGS} if all_findings else None)
    got = tuple(hashlib.sha256(b).hexdigest() for b in
                (np.ascontiguousarray(ph.volume.array).tobytes(), np.ascontiguousarray(ph.mask).tobytes(), ph.report.encode()))
    assert got == MORE_PHANTOMS[(seed, all_findings)]
