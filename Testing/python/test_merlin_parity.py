"""Merlin: the same numbers as the official ``merlin-vlm`` package, its checkpoint layout, exact maps.

The official model is built by the package's own ``MerlinArchitecture`` in the reference
environment (``reference_packages.run_reference``), with two downloads replaced by local
objects: torchvision's ImageNet ResNet-152 by an untrained one, Clinical-Longformer by a
small LongformerModel (768 wide, as Merlin's 768 -> 512 projection requires) with a byte-level
BPE tokenizer written here.  Every weight is then drawn from a seeded generator (the
inflation's zero temporal taps and batch-norm defaults would hide axis mistakes), the state
dict is saved with ``torch.save`` exactly as the published ``.pt``, and ``load_merlin`` must
reproduce the package's outputs within 1e-4.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medalign.core.errors import CheckpointError
from medalign.models import family_loader
from medalign.models.i3resnet import I3ResNetConfig
from medalign.models.merlin import (
    CONVERT_HINT,
    LOGIT_SCALE,
    MerlinModel,
    checkpoint_layout,
    droppable_keys,
    load_merlin,
    sanitize_report,
    to_published,
)

sys.path.insert(0, str(Path(__file__).parent))
from reference_packages import run_reference  # noqa: E402

ATOL = 1e-4
WEIGHTS_NAME = "i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt"  # merlin/models/load.py
TEXTS = ["There is no ascites.", "Hepatomegaly is present; the LIVER spans 19 cm!", "normal spleen", "Gallstones."]
IMAGE_SHAPE = (2, 1, 64, 96, 48)  # (B, 1, H, W, D): a 2 x 3 x 3 feature grid, every axis length different


def make_text_folder(folder: Path) -> Path:
    """A small Longformer config plus a byte-level BPE tokenizer (every byte a token, a few merges)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import LongformerConfig

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for char in sorted(ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
    merges = ["Ġ t", "h e", "Ġ a", "i s", "Ġt he", "r e", "Ġ is", "Ġ n", "o n", "Ġn o", "e r", "Ġ s"]
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    vocab["<mask>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    LongformerConfig(
        vocab_size=len(vocab), hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=256,
        attention_window=[8, 8], max_position_embeddings=130, type_vocab_size=1,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    ).save_pretrained(str(folder))
    return folder


# Builds merlin-vlm's MerlinArchitecture with seeded weights and saves it as the published .pt;
# argv: text folder, output folder, weights file name.  Also writes layout.json: the state
# dict layout of the full-size model (ResNet-152 + Clinical-Longformer's sizes), built on
# the meta device.  Shared with Testing/benchmarks/bench_merlin_forward.py.
OFFICIAL_BUILD = r"""
import json, sys, types
from pathlib import Path
import torch, torchvision
from safetensors.torch import save_file
from transformers import AutoTokenizer, LongformerConfig, LongformerModel

text_dir, out_dir, weights_name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
_resnet152 = torchvision.models.resnet152
torchvision.models.resnet152 = lambda pretrained=False, **kw: _resnet152(weights=None)  # no ImageNet download
from merlin.models import build

def longformer(config):
    build.AutoModel = types.SimpleNamespace(from_pretrained=lambda name: LongformerModel(config))

# 1. the published layout: the full-size model (ResNet-152 + Clinical-Longformer's sizes) on the meta device
build.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda name: AutoTokenizer.from_pretrained(str(text_dir)))
longformer(LongformerConfig(vocab_size=50265, max_position_embeddings=4098, type_vocab_size=1, attention_window=512, pad_token_id=1))
with torch.device("meta"):
    full = build.MerlinArchitecture()
layout = {k: list(v.shape) for k, v in full.state_dict().items()}
(out_dir / "layout.json").write_text(json.dumps(layout))

# 2. the small-text model with seeded weights
longformer(LongformerConfig.from_pretrained(str(text_dir)))
with torch.device("meta"):
    model = build.MerlinArchitecture()
model = model.to_empty(device="cpu")
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            t.zero_()
        elif t.ndim == 0:
            t.fill_(1.0)  # logit_scale, as initialised
        elif name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
        elif t.ndim == 1 and name.endswith("weight"):  # norm scales; small bn3 keeps 50 residual blocks tame
            t.copy_((torch.rand(t.shape, generator=g) * 0.5 + 0.5) * (0.5 if "bn3" in name else 1.0))
        elif t.ndim == 1:  # norm shifts, running means, biases
            t.copy_(torch.randn(t.shape, generator=g) * 0.01)
        else:  # He-normal on every tap
            t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
model.eval()
torch.save(model.state_dict(), out_dir / weights_name)

"""

OFFICIAL_OUTPUTS = r"""
torch.manual_seed(2)
shape = [int(s) for s in sys.argv[4].split(",")]
coarse = torch.rand(shape[0], 1, shape[2] // 8, shape[3] // 8, shape[4] // 8)
image = torch.nn.functional.interpolate(coarse, size=shape[2:], mode="trilinear")
texts = json.loads(sys.argv[5])
i3 = model.encode_image.i3_resnet
with torch.no_grad():
    img, ehr, txt = model(image, texts)
    flipped = model(image.flip(2), texts)[0]
    i3.return_skips = True
    contrastive, _, skips = i3(image)
    i3.return_skips = False
    enc = model.encode_text.tokenizer(
        [build.sanitize_report(t) for t in texts], return_tensors="pt", padding=True, truncation=True, max_length=1024)
save_file({
    "image": image, "image_embeds": img.contiguous(), "image_embeds_flipped": flipped.contiguous(),
    "image_unnormalised": contrastive.contiguous(), "feature_map": skips[-1].contiguous(),
    "phenotype_probs": torch.sigmoid(ehr).contiguous(), "text_embeds": txt.contiguous(),
    "input_ids": enc["input_ids"],
}, str(out_dir / "official.safetensors"))
print(json.dumps([build.sanitize_report(t) for t in texts]))
"""


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory) -> Path:
    return make_text_folder(tmp_path_factory.mktemp("clinical_longformer_small"))


@pytest.fixture(scope="module")
def official(text_folder: Path, tmp_path_factory) -> tuple[Path, dict, list[str]]:
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("merlin_official")
    shape = ",".join(map(str, IMAGE_SHAPE))
    stdout = run_reference(OFFICIAL_BUILD + OFFICIAL_OUTPUTS, text_folder, out, WEIGHTS_NAME, shape, json.dumps(TEXTS))
    return out, load_file(str(out / "official.safetensors")), json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ours(official, text_folder: Path) -> MerlinModel:
    return family_loader("merlin")(official[0] / WEIGHTS_NAME, text_folder, "cpu")


@pytest.fixture(scope="module")
def feats(ours: MerlinModel, official):
    """One encoding of the official test images, shared by the score and map tests."""
    with torch.inference_mode():
        return ours.image_features(official[1]["image"])


def close(have: torch.Tensor, want: torch.Tensor, what: str) -> float:
    assert tuple(have.shape) == tuple(want.shape), f"{what}: shape {list(have.shape)} != {list(want.shape)}"
    err = (have.double() - want.double()).abs().max().item()
    assert err <= ATOL, f"{what}: max abs diff {err:.3g} > {ATOL}"
    return err


# ----------------------------------------------------------------------------- parity


def test_published_layout_is_ours_key_for_key(official, text_folder: Path) -> None:
    """ResNet-152 + Clinical-Longformer sizes: the official state dict has exactly our keys and shapes."""
    from transformers import LongformerConfig

    layout = json.loads((official[0] / "layout.json").read_text())
    text_cfg = LongformerConfig(vocab_size=50265, max_position_embeddings=4098, type_vocab_size=1, attention_window=512)
    ours_layout = checkpoint_layout(I3ResNetConfig(), text_cfg)
    # logit_scale is the one published tensor accepted but not kept (no official code path uses it)
    assert {k: tuple(v) for k, v in layout.items()} == {**ours_layout, "logit_scale": ()}
    assert set(droppable_keys(text_cfg)) & set(layout) == {"logit_scale"}
    def params(prefix: str) -> int:
        return sum(int(np.prod(s)) for k, s in layout.items() if k.startswith(prefix) and "running_" not in k and "num_batches" not in k)

    # the sizes the model card states: 1208 tensors, 270.9 M parameters
    assert len(layout) == 1208
    assert (params("encode_image."), params("encode_text.text_encoder."), params("encode_text.linear_layer.")) == (
        121_882_204, 148_659_456, 393_728)


def test_image_embeddings_and_feature_grid_match_official(ours: MerlinModel, official, feats) -> None:
    _, ref, _ = official
    image = ref["image"]
    # the test has power: flipping one axis moves the official embedding far beyond the tolerance
    assert (ref["image_embeds"] - ref["image_embeds_flipped"]).abs().max() > 10 * ATOL
    with torch.inference_mode():
        close(ours.encode_image(image), ref["image_embeds"], "normalised image embedding")
        close(feats.global_latent, ref["image_unnormalised"], "unnormalised image embedding")
        # official skips[-1] is layer4 permuted to (B, C, H', W', D'): our grid axes x, y, z
        close(ours.feature_map(image), ref["feature_map"].permute(0, 2, 3, 4, 1), "last feature map")
        close(ours.phenotype_probabilities(image), ref["phenotype_probs"], "phenotype probabilities")
    assert tuple(feats.tokens.shape) == (2, 2, 3, 3, 512)


def test_text_embeddings_and_tokens_match_official(ours: MerlinModel, official) -> None:
    _, ref, sanitized = official
    assert [sanitize_report(t) for t in TEXTS] == sanitized  # our regex = NLTK's wordpunct_tokenize
    enc = ours.tokenize(TEXTS)
    assert torch.equal(enc["input_ids"], ref["input_ids"])
    with torch.inference_mode():
        close(ours.encode_text(**enc), ref["text_embeds"], "text embedding")
        close(ours.text_latents(TEXTS, batch_size=3), ref["text_embeds"], "batched text latents")


def test_zero_shot_scores_match_official(ours: MerlinModel, official, feats) -> None:
    """Logit = LOGIT_SCALE x cosine; pos/neg probabilities from the official embeddings."""
    _, ref, _ = official
    want = LOGIT_SCALE * ref["image_embeds"] @ ref["text_embeds"].T
    with torch.inference_mode():
        have = ours.logits(feats, ours.text_latents(TEXTS))
    close(have, want, "logits")
    close(have[:, :2].softmax(-1), want[:, :2].softmax(-1), "zero-shot probability of a prompt pair")


def test_token_logits_add_up_to_the_global_logit(ours: MerlinModel, official, feats) -> None:
    """The map decomposition identity: per-position shares (bias share included) sum to the logit."""
    _, ref, _ = official
    with torch.inference_mode():
        text = ours.text_latents(TEXTS)
        logits, tokens = ours.logits(feats, text), ours.token_logits(feats, text)
    assert tuple(tokens.shape) == (2, len(TEXTS), 2, 3, 3)
    torch.testing.assert_close(tokens.sum(dim=(2, 3, 4)), logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(feats.tokens.sum(dim=(1, 2, 3)), ref["image_unnormalised"], atol=ATOL, rtol=0)
    # the shares are not uniform: the map says where, not just how much
    assert tokens.std(dim=(2, 3, 4)).min() > 1e-3 * tokens.abs().mean()
    assert ours.token_layout() == ((32, 32, 16), (0.0, 0.0, 0.0))


# ----------------------------------------------------------------------------- loading rules (small model)

SMALL = I3ResNetConfig(blocks=(1, 2, 1, 1), planes=(4, 8, 8, 8), stem=4, n_classes=5, dim_latent=512)


def small_state_dict(text_folder: Path) -> dict[str, torch.Tensor]:
    """A small Merlin in the published layout (our modules, published names, plus logit_scale)."""
    from transformers import LongformerConfig, LongformerModel

    torch.manual_seed(0)
    model = MerlinModel(SMALL, LongformerModel(LongformerConfig.from_pretrained(str(text_folder))))
    with torch.no_grad():
        for name, t in model.named_buffers():
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
    sd = {to_published(k): v for k, v in model.state_dict().items()}
    return sd | {"logit_scale": torch.tensor(1.0)}


@pytest.fixture(scope="module")
def small_pt(text_folder: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("merlin_small") / WEIGHTS_NAME
    torch.save(small_state_dict(text_folder), path)
    return path


def one_sentence(err: BaseException, *must_name: str) -> str:
    msg = str(err)
    assert "\n" not in msg and msg.endswith("."), msg
    for name in must_name:
        assert name in msg, f"{name!r} not named in: {msg}"
    return msg


def test_small_model_sizes_are_read_from_shapes(small_pt: Path, text_folder: Path) -> None:
    model = load_merlin(small_pt, text_folder)
    assert model.config == SMALL and model.training is False
    assert model.text_encoder.config.num_hidden_layers == 2 and model.text_max_length == 128
    assert model.default_findings == "abdominal" and model.profile.name == "merlin"


def test_wrong_layout_is_refused_naming_the_keys(text_folder: Path, tmp_path: Path) -> None:
    sd = small_state_dict(text_folder)
    del sd["encode_text.linear_layer.bias"]
    sd["encode_image.i3_resnet.fc.weight"] = torch.zeros(3, 3)
    sd["encode_image.i3_resnet.contrastive_head.bias"] = torch.zeros(7)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_merlin(tmp_path / "bad.pt", text_folder)
    one_sentence(err.value, "missing keys encode_text.linear_layer.bias", "unexpected keys encode_image.i3_resnet.fc.weight",
                 "contrastive_head.bias [7]")
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError) as err:
        load_merlin(tmp_path / "other.pt", text_folder)
    one_sentence(err.value, "not a Merlin model")


def test_text_encoder_folder_is_required_and_checked(small_pt: Path, text_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        load_merlin(small_pt, None)
    one_sentence(err.value, "Clinical-Longformer")
    (tmp_path / "config.json").write_text((text_folder / "config.json").read_text())
    with pytest.raises(CheckpointError) as err:
        load_merlin(small_pt, tmp_path)
    one_sentence(err.value, "no tokenizer")


def test_pickle_beyond_tensors_is_refused_with_the_conversion_that_works(
    small_pt: Path, text_folder: Path, tmp_path: Path
) -> None:
    sd = torch.load(small_pt, weights_only=True)
    torch.save({**sd, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "full.pt")
    with pytest.raises(CheckpointError) as err:
        load_merlin(tmp_path / "full.pt", text_folder)
    one_sentence(err.value, "refused for safety", CONVERT_HINT)
    # the one-liner the sentence gives, run as a user would (on a file they trust)
    code = re.fullmatch(r'python -c "(.*)"', CONVERT_HINT).group(1)
    code = code.replace("IN.pt", str(tmp_path / "full.pt")).replace("OUT.safetensors", str(tmp_path / "w.safetensors"))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    converted = load_merlin(tmp_path / "w.safetensors", text_folder)
    original = load_merlin(small_pt, text_folder)
    for (k, a), b in zip(converted.state_dict().items(), original.state_dict().values()):
        assert torch.equal(a, b), k
    (tmp_path / "cut.pt").write_bytes(small_pt.read_bytes()[:4000])
    with pytest.raises(CheckpointError) as err:
        load_merlin(tmp_path / "cut.pt", text_folder)
    one_sentence(err.value, "truncated or corrupt")


def test_small_model_screening_gives_probabilities_and_maps_on_the_input_grid(small_pt: Path, text_folder: Path) -> None:
    from medalign.core.volume import Volume
    from medalign.inference.screener import Screener

    rng = np.random.default_rng(0)
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])  # LPS-ordered file, finer than Merlin's grid
    affine[:3, 3] = (120.0, 100.0, -60.0)
    vol = Volume(rng.integers(-1000, 400, size=(50, 96, 110)).astype(np.int16), affine)
    findings = ["Ascites", "Splenomegaly", "a stone in the left kidney"]
    model = load_merlin(small_pt, text_folder)
    result = Screener(model, findings=findings, device="cpu")(vol, check=False)
    assert [f.name for f in result.findings] == findings
    for f in result.findings:
        assert 0.0 < f.probability < 1.0 and np.isfinite(f.score)
        amap = f.map
        assert amap is not None and amap.array.dtype == np.float32 and np.isfinite(amap.array).all()
        # on the input's grid: same axis directions, same first and last voxel centres
        np.testing.assert_allclose(amap.ijk_to_ras[:3, 3], vol.ijk_to_ras[:3, 3], atol=1e-6)
        direction = amap.ijk_to_ras[:3, :3] / np.linalg.norm(amap.ijk_to_ras[:3, :3], axis=0)
        np.testing.assert_allclose(direction, np.diag([-1.0, -1.0, 1.0]), atol=1e-9)
        last = amap.ijk_to_ras_points([np.asarray(amap.shape_ijk) - 1])[0]
        np.testing.assert_allclose(last, vol.ijk_to_ras_points([np.asarray(vol.shape_ijk) - 1])[0], atol=1e-4)
        assert np.abs(amap.array).max() > 0


# ----------------------------------------------------------------------------- preprocessing

OFFICIAL_TRANSFORMS = r"""
import sys
import torch
from safetensors.torch import save_file
from merlin.data.monai_transforms import ImageTransforms

out = {}
for n, path in enumerate(sys.argv[2:]):
    image = ImageTransforms({"image": path})["image"]
    out[f"image{n}"] = torch.as_tensor(image).float().contiguous()
    out[f"affine{n}"] = torch.as_tensor(image.affine).double().contiguous()
save_file(out, sys.argv[1])
"""

PARITY_CTS = ("abdomen_ct_3mm.nii.gz", "chest_ct_lung_mass.nii.gz")  # 3 mm iso; 1.68 mm x 5 mm, LPS


def test_preprocessing_matches_merlins_monai_transforms(real_ct: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from medalign.core.volume_io import read_volume
    from medalign.inference.preprocess import prepare
    from medalign.models.profiles import MERLIN

    paths = [real_ct / name for name in PARITY_CTS]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} in {real_ct}; absent here")
    run_reference(OFFICIAL_TRANSFORMS, tmp_path / "official.safetensors", *paths)
    ref = load_file(str(tmp_path / "official.safetensors"))
    for n, path in enumerate(paths):
        prepared = prepare(read_volume(path), MERLIN)
        close(prepared.tensor[0], ref[f"image{n}"], f"{path.name} model input")
        np.testing.assert_allclose(prepared.grid_to_ras, ref[f"affine{n}"].numpy(), atol=1e-6)
