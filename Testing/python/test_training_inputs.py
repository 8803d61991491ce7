"""What the demo model is trained on: extra input channels, token masks, the balanced dense
loss, cache keys and the parallel data steps."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from medalign.core.errors import InputError
from medalign.core.volume import Volume
from medalign.inference.preprocess import prepare
from medalign.models.base import ImageFeatures
from medalign.models.profiles import DEMO, PreprocessProfile

SOURCE_SPACING = (0.8, 0.8, 1.25)  # a thin-slice scan: one 4 x 4 x 5 mm voxel holds 5 x 5 x 4 of these


def _scan(shape_kji=(64, 120, 120), background=40.0) -> Volume:
    affine = np.diag([-SOURCE_SPACING[0], -SOURCE_SPACING[1], SOURCE_SPACING[2], 1.0])
    return Volume(np.full(shape_kji, background, dtype=np.float32), affine)


def _profile(channels) -> PreprocessProfile:
    return dataclasses.replace(DEMO, size=(24, 24, 16), channels=channels)


def _peak(prepared, channel: int) -> float:
    return float(prepared.tensor[0, channel].max())


def test_max_channel_keeps_a_2mm_calcification_that_averaging_erases():
    vol = _scan()
    vol.array[32:34, 60:62, 60:62] = 800.0  # about 1.6 x 1.6 x 2.5 mm at 800 HU in soft tissue
    prepared = prepare(vol, _profile((("max", 150.0, 2000.0),)))
    assert prepared.tensor.shape[1] == 2
    lo, hi = 150.0, 2000.0
    expected = -1.0 + 2.0 * (800.0 - lo) / (hi - lo)
    assert _peak(prepared, 1) == pytest.approx(expected, abs=0.05)  # the true HU survives
    # channel 0 (antialiased mean, window -1000..1000) keeps only a faint trace of it
    assert _peak(prepared, 0) < (100.0 + 1000.0) / 1000.0 - 1.0
    # soft tissue is below the max window: the floor
    assert float(prepared.tensor[0, 1, 2, 2, 2]) == pytest.approx(-1.0)


def test_min_channel_keeps_a_small_air_pocket():
    vol = _scan()
    vol.array[32:34, 60:62, 60:62] = -950.0
    prepared = prepare(vol, _profile((("min", -1000.0, 100.0),)))
    assert float(prepared.tensor[0, 1].min()) == pytest.approx(-1.0 + 2.0 * 50.0 / 1100.0, abs=0.05)


def test_mean_channel_is_channel_zero_under_another_window():
    vol = _scan(background=-850.0)
    prepared = prepare(vol, _profile((("mean", -1000.0, -500.0),)))
    centre = prepared.tensor[0, :, 12, 12, 8]
    assert float(centre[0]) == pytest.approx(-0.85, abs=0.01)
    assert float(centre[1]) == pytest.approx(-1.0 + 2.0 * 150.0 / 500.0, abs=0.02)  # 4x the contrast


def test_unknown_reducer_is_one_sentence():
    with pytest.raises(InputError, match="Unknown channel reducer 'median'"):
        prepare(_scan(), _profile((("median", 0.0, 100.0),)))


def test_profile_channels_survive_a_json_round_trip_and_old_profiles_have_none():
    import json

    back = PreprocessProfile.from_dict(json.loads(json.dumps(DEMO.to_dict())))
    assert back == DEMO and back.n_channels == 3
    old = {k: v for k, v in DEMO.to_dict().items() if k != "channels"}  # as written by version 1 checkpoints
    assert PreprocessProfile.from_dict(old).n_channels == 1


# ------------------------------------------------------------------ token masks
def test_token_mask_marks_the_token_of_a_single_voxel_lesion():
    from medalign.training.prepared import token_mask

    size, stride = (24, 24, 16), 4
    grid_to_ras = np.diag([2.0, 2.0, 2.0, 1.0])  # model voxel (x, y, z) sits at 2 * (x, y, z) mm
    mask = Volume(np.zeros((32, 48, 48), dtype=np.int32), np.diag([1.0, 1.0, 1.0, 1.0]))
    mask.array[20, 30, 10] |= 1 << 9  # one 1 mm voxel at RAS (10, 30, 20) -> model voxel (5, 15, 10)
    mask.array[:, :, 40:] |= 1 << 2  # a slab from RAS x = 40 mm -> model x >= 20 -> tokens x >= 5
    tokens = token_mask(mask, grid_to_ras, size, stride).numpy()
    assert tokens.shape == (6, 6, 4)
    hit = np.argwhere((tokens >> 9) & 1)
    assert hit.tolist() == [[1, 3, 2]]
    slab = (tokens >> 2) & 1
    assert slab[:5].sum() == 0 and slab[5:].all()


def test_token_mask_of_an_empty_mask_is_empty():
    from medalign.training.prepared import token_mask

    mask = Volume(np.zeros((8, 8, 8), dtype=np.int32), np.eye(4))
    assert not token_mask(mask, np.eye(4), (8, 8, 8), 4).any()


def test_cache_key_follows_profile_and_stride():
    from medalign.training.prepared import cache_key

    assert cache_key(DEMO, 4) == cache_key(DEMO, 4)
    assert cache_key(DEMO, 4) != cache_key(DEMO, 2)
    assert cache_key(DEMO, 4) != cache_key(dataclasses.replace(DEMO, channels=()), 4)


# ------------------------------------------------------------------ dense loss
class _FixedTokenLogits:
    """Stands in for the model: token_logits returns preset (b, 2F, X, Y, Z) values."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def token_logits(self, feats, text):
        return self.logits


def test_dense_loss_weighs_each_finding_equally():
    from medalign.training.losses import local_alignment_loss

    n_f, grid = 2, (4, 4, 1)
    pos_logit = torch.zeros(1, n_f, *grid)
    neg_logit = torch.zeros(1, n_f, *grid)
    masks = torch.zeros(*grid, dtype=torch.int32)
    masks[0, 0, 0] |= 1  # finding 0: one lesion token ...
    neg_logit[0, 0, 0, 0, 0] = 3.0  # ... which the model calls absent (a large loss)
    masks[:, :2] |= 2  # finding 1: eight lesion tokens, all called present
    pos_logit[0, 1, :, :2] = 3.0
    pos_logit[0, 1, :, 2:] = -3.0  # and its other tokens called absent
    pos_logit[0, 0, 1:] = -3.0
    pos_logit[0, 0, 0, 1:] = -3.0
    logits = torch.cat([pos_logit, neg_logit], dim=1)
    feats = ImageFeatures(torch.zeros(1, 4), torch.zeros(1, *grid, 4))
    y = torch.tensor([[1, 1]])
    loss = local_alignment_loss(_FixedTokenLogits(logits), feats, torch.zeros(n_f, 4), torch.zeros(n_f, 4),
                                [masks], torch.tensor([0, 1]), y)

    def ce(present: float, absent: float, target_present: bool) -> float:
        p = torch.log_softmax(torch.tensor([float(present), float(absent)]), 0)
        return float(-p[0 if target_present else 1])

    pos = (ce(0, 3, True) + ce(3, 0, True)) / 2  # per finding, then over findings
    neg = (ce(-3, 0, False) + ce(-3, 0, False)) / 2
    assert float(loss) == pytest.approx((pos + neg) / 2, rel=1e-5)


def test_lesion_prior_counts_where_lesions_sit_and_widens_by_one_token():
    from medalign.training.losses import lesion_prior

    a = torch.zeros(5, 5, 1, dtype=torch.int32)
    b = torch.zeros(5, 5, 1, dtype=torch.int32)
    a[2, 2, 0] = 1  # finding bit 0 in one of two masked cases
    b[0, 0, 0] = 2  # bit 1
    prior = lesion_prior([a, None, b], torch.tensor([0, 1, -1]))
    assert prior.shape == (3, 5, 5, 1)
    assert float(prior[0, 2, 2, 0]) == 0.5 and float(prior[0, 1, 3, 0]) == 0.5  # a neighbour (shift augmentation)
    assert float(prior[0, 4, 4, 0]) == 0.0
    assert float(prior[1, 1, 1, 0]) == 0.5 and float(prior[1, 3, 3, 0]) == 0.0
    assert float(prior[2].sum()) == 0.0  # a finding without a mask bit has no prior
    assert lesion_prior([None, None], torch.tensor([0])) is None


def test_prior_weighted_negatives_count_lesion_free_tokens_where_lesions_usually_are():
    from medalign.training.losses import local_alignment_loss

    grid = (4, 1, 1)
    pos_logit = torch.zeros(1, 1, *grid)
    pos_logit[0, 0, 1] = 2.0  # a lesion-free token the model calls present
    logits = torch.cat([pos_logit, torch.zeros(1, 1, *grid)], dim=1)
    feats = ImageFeatures(torch.zeros(1, 4), torch.zeros(1, *grid, 4))
    masks = torch.zeros(*grid, dtype=torch.int32)  # a negative case: no lesion
    prior = torch.zeros(1, *grid)
    prior[0, 1] = 0.3  # ... at the one place lesions of this finding occur
    args = (_FixedTokenLogits(logits), feats, torch.zeros(1, 4), torch.zeros(1, 4), [masks], torch.tensor([0]),
            torch.tensor([[0]]))
    softplus = torch.nn.functional.softplus
    uniform = float((softplus(torch.tensor(2.0)) + 3 * softplus(torch.tensor(0.0))) / 4)
    assert float(local_alignment_loss(*args)) == pytest.approx(uniform, rel=1e-5)
    # half of the negative term now sits on the token where lesions are usually found
    assert float(local_alignment_loss(*args, prior=prior)) == pytest.approx((uniform + float(softplus(torch.tensor(2.0)))) / 2, rel=1e-5)


def test_decision_directions_and_their_overlap():
    from medalign.training.losses import decision_directions, direction_overlap

    # finding 0: present (1, 0, 0) vs absent (0, 1, 0); finding 1: present (1, 0, 0) vs absent (0, 0, 1)
    z = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    y = torch.tensor([0, 1, 2, 3])  # classes: pos 0, pos 1, neg 0, neg 1
    d = decision_directions(z, y, 2)
    s = 2 ** -0.5
    assert torch.allclose(d, torch.tensor([[s, -s, 0], [s, 0, -s]]), atol=1e-6)
    assert float(direction_overlap(d)) == pytest.approx(0.25, abs=1e-6)  # cosine 1/2, squared
    assert float(direction_overlap(torch.eye(3))) == 0.0
    assert float(direction_overlap(torch.tensor([[1.0, 0], [-1.0, 0]]))) == pytest.approx(1.0)


def test_text_warm_up_makes_findings_decision_directions_orthogonal():
    """MiniLM gives "X" / "no X" pairs a shared "abnormal" and "negated" component, so after
    the plain warm-up the findings' present-minus-absent directions are nearly parallel (one
    finding's score follows another's); the penalty removes the overlap and keeps every
    sentence nearest its own class."""
    from helpers import tiny_config

    from medalign.models.medalign_model import MedAlignModel, build_text_encoder
    from medalign.training.losses import decision_directions, direction_overlap
    from medalign.training.sentences import finding_sentences
    from medalign.training.text_anchors import warm_up_text_projection

    cfg = tiny_config()
    encoder = build_text_encoder(None, cfg)
    findings = ["Lung nodule", "Lung opacity", "Pleural effusion", "Lymphadenopathy", "Emphysema", "Bronchiectasis"]
    sentences = [finding_sentences(f) for f in findings]
    pos = [encoder.embed(p) for p, _ in sentences]
    neg = [encoder.embed(n) for _, n in sentences]
    z_all = torch.cat(pos + neg)
    y = torch.cat([torch.full((len(t),), k) for k, t in enumerate(pos + neg)])

    def overlap(decorrelate: float) -> float:
        torch.manual_seed(0)
        model = MedAlignModel(cfg)
        warm_up_text_projection(model, pos, neg, steps=150, decorrelate=decorrelate)
        with torch.no_grad():
            z = model.project_text(z_all)
            centroids = torch.nn.functional.normalize(torch.stack([z[y == k].mean(0) for k in range(len(pos) * 2)]), dim=-1)
            assert float(((z @ centroids.T).argmax(1) == y).float().mean()) > 0.95
            return float(direction_overlap(decision_directions(z, y, len(findings))))

    assert overlap(0.0) > 0.2
    assert overlap(1.0) < 0.02


def test_embedded_demo_model_scores_findings_along_independent_directions():
    """The shipped model was trained with the decorrelated warm-up: on the inference
    wordings (never seen in training) no two findings share their decision direction."""
    from medalign.inference.screener import Screener
    from medalign.training.losses import direction_overlap

    screener = Screener(device="cpu")
    d = torch.nn.functional.normalize(torch.stack([p.ensemble[0] - p.ensemble[1] for p in screener.prompts]), dim=-1)
    cos = d @ d.T
    assert len(d) == 18
    assert float(cos[~torch.eye(len(d), dtype=torch.bool)].abs().max()) < 0.25
    assert float(direction_overlap(d)) < 0.01


def test_local_head_depthwise_option_and_old_checkpoints():
    from helpers import tiny_config

    from medalign.models.medalign_model import MedAlignConfig, MedAlignModel

    cfg = tiny_config()
    assert not MedAlignConfig().local_depthwise  # new models leave it out
    old = json.loads(cfg.to_json())
    old.pop("local_depthwise")  # a checkpoint written by demo versions 1-2
    assert MedAlignConfig.from_json(json.dumps(old)).local_depthwise
    with_dw = MedAlignModel(dataclasses.replace(cfg, local_depthwise=True))
    without = MedAlignModel(dataclasses.replace(cfg, local_depthwise=False))
    assert len(with_dw.local_fuse) == 5 and len(without.local_fuse) == 3
    x = torch.zeros(1, cfg.profile.n_channels, *cfg.profile.size)
    assert without.image_features(x).tokens.shape == with_dw.image_features(x).tokens.shape


# ------------------------------------------------------------------ parallel data steps
def _square(x: int) -> int:
    return x * x


def test_ordered_map_keeps_order_and_checks_workers():
    from medalign.core.parallel import ordered_map

    assert list(ordered_map(_square, range(7), workers=2)) == [x * x for x in range(7)]
    assert list(ordered_map(_square, [3], workers=4)) == [9]
    with pytest.raises(InputError, match="at least 1"):
        list(ordered_map(_square, range(3), workers=0))


def test_phantoms_do_not_depend_on_the_number_of_workers(tmp_path):
    from medalign.synth.phantoms import write_dataset

    one = write_dataset(tmp_path / "one", 3, seed=11, progress=False, workers=1)
    two = write_dataset(tmp_path / "two", 3, seed=11, progress=False, workers=2)
    for rel in ["labels.csv", "reports.csv", "volumes/phantom_11_00002.nii.gz", "masks/phantom_11_00001.nii.gz"]:
        assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel
