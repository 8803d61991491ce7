"""A second screening of a volume in memory skips preprocessing and image encoding, and only then."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import new_app, synthetic_ct, tiny_test_model

from medalign.inference import feature_cache
from medalign.inference.screener import Screener


@pytest.fixture()
def counted(monkeypatch):
    """A real tiny model whose image encodings are counted."""
    feature_cache.clear_feature_cache()
    model = tiny_test_model(seed=0)
    calls = []
    encode = model.image_features

    def image_features(x):
        calls.append(x.shape)
        return encode(x)

    monkeypatch.setattr(model, "image_features", image_features)
    yield model, calls
    feature_cache.clear_feature_cache()


def _numbers(result):
    return [(f.name, f.probability, f.uncertainty, f.score, None if f.map is None else f.map.array.tobytes())
            for f in result.findings]


def test_second_screening_with_other_findings_encodes_no_image_and_matches_a_cold_one(counted):
    model, calls = counted
    volume = synthetic_ct(blob_ras=(20.0, 30.0, -10.0))
    Screener(model, findings=["Emphysema"], device="cpu")(volume)
    second = Screener(model, findings=["Lung nodule", "Pleural effusion"], device="cpu")
    warm = second(volume)
    assert len(calls) == 1  # the second screening reused the first's encoding
    feature_cache.clear_feature_cache()
    cold = second(volume)
    assert len(calls) == 2
    assert _numbers(warm) == _numbers(cold) and warm.warnings == cold.warnings


def test_changed_voxels_or_weights_are_encoded_again(counted):
    model, calls = counted
    volume = synthetic_ct()
    screener = Screener(model, findings=["Lung nodule"], device="cpu")
    first = screener(volume)
    volume.array[20, 32, 32] += 500  # in place: same array object, other content
    changed = screener(volume)
    assert len(calls) == 2
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)  # in place, like an optimizer step
    screener(volume)
    assert len(calls) == 3
    assert _numbers(changed) != _numbers(first)
    feature_cache.clear_feature_cache()
    assert _numbers(Screener(model, findings=["Lung nodule"], device="cpu")(volume)) != _numbers(changed)


def test_the_cache_keeps_at_most_two_volumes_and_can_be_turned_off(counted, monkeypatch):
    model, calls = counted
    screener = Screener(model, findings=["Lung nodule"], device="cpu")
    volumes = [synthetic_ct(seed=s) for s in range(3)]
    for v in volumes:
        screener(v, with_maps=False)
    assert len(feature_cache._CACHE.entries) == feature_cache.MAX_ENTRIES == 2
    screener(volumes[0], with_maps=False)  # evicted: encoded again
    screener(volumes[2], with_maps=False)  # still kept
    assert len(calls) == 4
    monkeypatch.setenv("MEDALIGN_FEATURE_CACHE_MB", "0")
    screener(volumes[2], with_maps=False)
    assert len(calls) == 5


def test_the_console_second_click_on_a_scene_node_hits(counted):
    """``logic.screen`` copies the node's voxels on every call: the digest, not the array object, must hit."""
    from MedAlignLib.logic import ScreeningLogic
    from MedAlignLib.nodes import node_from_volume

    model, calls = counted
    app = new_app()
    node = node_from_volume(app.scene, synthetic_ct(), "CT")
    logic = ScreeningLogic(app.scene)
    logic.screen(node, findings=["Emphysema"], model=model, device="cpu")
    second = logic.screen(node, findings=["Lung nodule"], model=model, device="cpu")
    assert len(calls) == 1 and [f.name for f in second.findings] == ["Lung nodule"]


def test_volume_digest_sees_geometry_and_dtype():
    volume = synthetic_ct()
    moved = synthetic_ct()
    moved.ijk_to_ras[0, 3] += 1.0
    as_float = synthetic_ct()
    as_float.array = as_float.array.astype(np.float32)
    digests = {feature_cache.volume_digest(v) for v in (volume, synthetic_ct(), moved, as_float)}
    assert len(digests) == 3
