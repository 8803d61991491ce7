"""COLIPRI: the official ``colipri`` package is the judge of our own implementation.

One reference run (``reference_packages.run_reference``) builds the official model with a
SMALL config of the same code (2 EVA blocks, 48 wide, 32³ input, a 2-layer 24-wide BERT,
deterministic random weights), saves it with the official ``save_weights`` (the published
``model.safetensors`` layout), and records its image, text and zero-shot outputs, the
full-size model's key layout (built empty) and, when the shared real CT is here, the
official processor's output for it.  We load that file with ``load_colipri`` and compare.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED
from helpers import assert_one_sentence, synthetic_ct
from reference_packages import run_reference

from medalign.core.errors import CheckpointError
from medalign.core.volume import Volume
from medalign.core.volume_io import read_volume, write_volume
from medalign.models import FAMILY_LOADERS, family_loader
from medalign.models.colipri import COLIPRIConfig, COLIPRIModel, checkpoint_layout, load_colipri
from medalign.models.profiles import COLIPRI as COLIPRI_PROFILE

ATOL = 1e-4
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "lung", "nodule", "nodules", "no", "present", "emphysema",
         "pleural", "effusion", "."]
PROMPTS = ["Lung nodules present", "No lung nodules present", "Pleural effusion present"]
SMALL = {"input_size": 32, "eva_numheads": 2, "image_pooler_num_heads": 4, "text_pooler_num_heads": 2}
BERT = {"vocab_size": len(VOCAB), "hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 3,
        "intermediate_size": 48}
SPEC = {
    "seed": 0, "noise": 0.05, "temperature": 0.07, "prompts": PROMPTS, "bert": BERT,
    "overrides": {
        "input_size": SMALL["input_size"], "image_embed_dim": 48, "projection_dim": 24,
        "model.image_encoder.backbone.eva_depth": 2, "model.image_encoder.backbone.eva_numheads": SMALL["eva_numheads"],
        "model.image_encoder.pooler.num_heads": SMALL["image_pooler_num_heads"],
        "model.text_encoder.pooler.num_heads": SMALL["text_pooler_num_heads"],
    },
}
REAL_CT = SHARED / "data" / "real_ct" / "chest_ct_lung_mass.nii.gz"

REFERENCE_SCRIPT = r'''
import json, sys
from pathlib import Path

import torch
import torchio as tio
from accelerate import init_empty_weights
from hydra.utils import instantiate
from safetensors.torch import save_file
from transformers import BertConfig, BertModel, BertTokenizer

from colipri import get_processor
from colipri.checkpoint import load_model_config
from colipri.model.multimodal import Model
from colipri.model.text import TextEncoder
from colipri.pipelines import ZeroShotImageClassificationPipeline
from colipri.processor import Processor

out, vocab, spec, cts = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])


def build(config, bert_config):
    bert = BertModel(bert_config, add_pooling_layer=False)  # what TextEncoder keeps of CXR-BERT
    return Model(instantiate(config.image_encoder), TextEncoder(bert, instantiate(config.text_encoder.pooler)))


# the published model's layout: default config, CXR-BERT sizes (BertConfig defaults), built empty
with init_empty_weights():
    full = build(load_model_config(), BertConfig())
layout = {k: list(v.shape) for k, v in full.state_dict().items()}
(out / "full_layout.json").write_text(json.dumps(layout))

torch.manual_seed(spec["seed"])
config = load_model_config(overrides=[f"{k}={v}" for k, v in spec["overrides"].items()])
model = build(config, BertConfig(**spec["bert"]))
with torch.no_grad():  # every tensor away from its init (gammas 0.1, zero biases, unit norms)
    for p in model.parameters():
        p.add_(torch.randn_like(p) * spec["noise"])
# the official Model registers torch.tensor(1), an int64 buffer: a trained temperature is a float
model.softmax_temperature = torch.tensor(spec["temperature"], dtype=torch.float32)
model.eval()
model.save_weights(out / "model.safetensors")

size = spec["overrides"]["input_size"]
images = torch.randn(2, 1, size, size, size)
processor = Processor(image_transform=lambda image: image, tokenizer=BertTokenizer(vocab, do_lower_case=True))
ids, mask = processor.process_text(spec["prompts"])
with torch.no_grad():
    result = {
        "images": images,
        "patches": model.encode_image(images),
        "dense": model.encode_image(images, project=True, pool=False),
        "global": model.encode_image(images, project=True, pool=True, normalize=True),
        "text": model.encode_text(ids, mask),
        "input_ids": ids,
    }
pipeline = ZeroShotImageClassificationPipeline(model, processor)
scores = pipeline([tio.ScalarImage(tensor=image) for image in images], spec["prompts"])
result["scores"] = torch.tensor([[s["score"] for s in per_image] for per_image in scores])
for name, path in cts.items():  # the official processor on each CT file
    processed = get_processor(image_only=True).process_images(tio.ScalarImage(path))[0]
    result[name] = processed.data.float()
    result[name + "_affine"] = torch.as_tensor(processed.affine)
save_file({k: v.contiguous() for k, v in result.items()}, str(out / "reference.safetensors"))
'''



def _no_air_ct() -> Volume:
    """An int16 LPS CT with no air (darkest voxel -500 HU), 448 x 448 x 120 mm: the 2 mm grid
    crops x and y and pads z, and the padding must be the image minimum, not -1000 HU."""
    volume = synthetic_ct(shape_kji=(40, 64, 64), spacing=(7.0, 7.0, 3.0), seed=3)
    volume.array = np.maximum(volume.array, -500).astype(np.int16)
    return volume


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> dict:
    """The official package's small model (on disk, published layout) and its outputs."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertTokenizer

    root = tmp_path_factory.mktemp("colipri")
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    cts = {"synthetic": str(write_volume(_no_air_ct(), root / "no_air.nii.gz"))}
    if REAL_CT.is_file():
        cts["ct"] = str(REAL_CT)
    run_reference(REFERENCE_SCRIPT, root, root / "vocab.txt", json.dumps(SPEC), json.dumps(cts))
    (root / "config.json").write_text(json.dumps(SMALL))  # the sizes no tensor shape holds
    folder = root / "cxr-bert"
    folder.mkdir()
    BertTokenizer(str(root / "vocab.txt"), do_lower_case=True).save_pretrained(str(folder))
    BertConfig(**BERT).save_pretrained(str(folder))
    layout = {k: tuple(v) for k, v in json.loads((root / "full_layout.json").read_text()).items()}
    return {"root": root, "folder": folder, "out": load_file(str(root / "reference.safetensors")), "layout": layout}


@pytest.fixture(scope="module")
def model(ref: dict) -> COLIPRIModel:
    return load_colipri(ref["root"] / "model.safetensors", ref["folder"])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert tuple(a.shape) == tuple(b.shape)
    return (a.double() - b.double()).abs().max().item()


def test_registered_family_and_profile() -> None:
    assert FAMILY_LOADERS["colipri"] == "medalign.models.colipri:load_colipri"
    assert family_loader("colipri") is load_colipri
    p = COLIPRI_PROFILE
    assert (p.name, p.axcodes, p.spacing, p.size, p.grid) == ("colipri", "RAS", (2.0, 2.0, 2.0), (192, 192, 192), "torchio")
    assert (p.hu_window, p.out_range, p.pad_with_minimum, p.antialias, p.mean) == ((-1000.0, 1000.0), (-1.0, 1.0), True, False, None)
    assert COLIPRIModel.prompt_templates == {"positive": ["{finding} present"], "negative": ["No {finding} present"]}
    assert COLIPRIModel.use_knowledge_prompts


def test_published_layout_key_for_key(ref: dict) -> None:
    """Our full-size model (CXR-BERT sizes) has exactly the official model's 581 tensors."""
    from transformers import BertConfig

    ours = checkpoint_layout(COLIPRIConfig(), BertConfig())
    assert len(ref["layout"]) == 581
    assert ours == ref["layout"]
    assert sum(int(np.prod(s)) for s in ours.values()) == 258_367_105


def test_small_model_sizes_and_round_trip(ref: dict, model: COLIPRIModel) -> None:
    from safetensors.torch import load_file

    v = model.config.vision
    assert (v.embed_dim, v.depth, v.num_heads, v.patch_size, v.input_size, v.mlp_hidden) == (48, 2, 2, (8, 8, 8), (32,) * 3, 128)
    assert model.profile.size == (32, 32, 32) and model.token_layout() == ((8, 8, 8), (3.5, 3.5, 3.5))
    saved = load_file(str(ref["root"] / "model.safetensors"))
    assert set(saved) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key].to(value.dtype)), key
    assert model.softmax_temperature.item() == pytest.approx(0.07)


def test_image_embeddings_match_official(ref: dict, model: COLIPRIModel) -> None:
    out = ref["out"]
    with torch.inference_mode():
        ours = model.image_outputs(out["images"])
        feats = model.image_features(out["images"])
        pooled = model.encode_image(out["images"])
    assert max_diff(ours["patch_embeddings"], out["patches"]) <= ATOL
    assert max_diff(ours["dense"], out["dense"]) <= ATOL
    assert max_diff(pooled, out["global"]) <= ATOL
    # tokens are the dense patches in grid order (x, y, z, channel); the global latent is the pooled one
    assert max_diff(feats.tokens, out["dense"].permute(0, 2, 3, 4, 1)) <= ATOL
    assert max_diff(torch.nn.functional.normalize(feats.global_latent, dim=-1), out["global"]) <= ATOL


def test_text_embeddings_and_tokens_match_official(ref: dict, model: COLIPRIModel) -> None:
    out = ref["out"]
    ids = model.tokenize(PROMPTS)["input_ids"]
    official = out["input_ids"]
    assert torch.equal(ids, official[:, : ids.shape[1]]) and not official[:, ids.shape[1]:].any()
    with torch.inference_mode():
        ours = model.text_latents(PROMPTS)  # padded to the longest prompt, the official to 512
    assert max_diff(ours, out["text"]) <= ATOL


def test_zero_shot_scores_match_official_pipeline(ref: dict, model: COLIPRIModel) -> None:
    out = ref["out"]
    with torch.inference_mode():
        logits = model.logits(model.image_features(out["images"]), model.text_latents(PROMPTS))
    assert max_diff(logits.softmax(dim=-1), out["scores"]) <= ATOL
    spread = out["scores"].max(dim=-1).values - out["scores"].min(dim=-1).values
    assert (spread > 0.05).all()  # temperature 0.07 separates the prompts: not a trivially uniform score


def test_token_logits_are_cosine_over_temperature(model: COLIPRIModel) -> None:
    torch.manual_seed(1)
    image = torch.randn(1, 1, 32, 32, 32)
    with torch.inference_mode():
        feats = model.image_features(image)
        text = model.text_latents(PROMPTS[:2])
        maps = model.token_logits(feats, text)
    assert maps.shape == (1, 2, 4, 4, 4)
    cos = torch.nn.functional.cosine_similarity(feats.tokens[0, 1, 2, 3], text[1], dim=0)
    assert maps[0, 1, 1, 2, 3].item() == pytest.approx(cos.item() / 0.07, abs=1e-4)


def test_preprocessing_matches_official_processor(ref: dict, real_ct: Path) -> None:
    """The official processor (torchio + SimpleITK) vs our ``prepare`` on the real chest CT
    (int16, 1.68 mm pixels, 5 mm slices: x and y are cropped, z is upsampled and padded)."""
    out = ref["out"]
    if "ct" not in out:
        pytest.skip(f"the reference run did not see {REAL_CT}")
    ours = assert_same_preprocessing(real_ct / "chest_ct_lung_mass.nii.gz", out["ct"], out["ct_affine"])
    assert ours.min() == -1 and ours.max() == 1


def test_preprocessing_pads_with_the_minimum_like_official(ref: dict) -> None:
    """No air in the scan: torchio pads with its minimum (-500 HU -> -0.5), not with -1."""
    out = ref["out"]
    ours = assert_same_preprocessing(ref["root"] / "no_air.nii.gz", out["synthetic"], out["synthetic_affine"])
    assert ours.min() == pytest.approx(-0.5) and ours[0, 96, 96, 0] == pytest.approx(-0.5)  # a padded z slice


def assert_same_preprocessing(path: Path, theirs: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Our ``prepare`` equals the official processor's tensor and affine."""
    from medalign.inference.preprocess import prepare

    prepared = prepare(read_volume(path), COLIPRI_PROFILE)
    ours = prepared.tensor[0]
    assert ours.shape == theirs.shape == (1, 192, 192, 192)
    np.testing.assert_allclose(prepared.grid_to_ras, affine.numpy(), atol=1e-6)
    # every voxel, including those where ITK truncates an interpolated integer HU (a position
    # one ulp off a voxel centre would turn 41 HU into 40, a 0.001 step)
    assert max_diff(ours, theirs) <= ATOL
    return ours


# ----------------------------------------------------------------------------- refusals


def test_wrong_key_layout_is_one_sentence(ref: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(ref["root"] / "model.safetensors"))
    sd.pop("image_encoder.pooler.attn.out_proj.bias")
    sd["image_encoder.backbone.up_projection.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    with pytest.raises(CheckpointError) as info:
        load_colipri(tmp_path / "model.safetensors", ref["folder"])
    assert_one_sentence(
        info.value, "COLIPRI", "model.safetensors", "image_encoder.pooler.attn.out_proj.bias",
        "image_encoder.backbone.up_projection.weight",
    )


def test_missing_text_encoder_and_not_colipri_are_one_sentence(ref: dict, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(CheckpointError) as info:
        load_colipri(ref["root"] / "model.safetensors", None)
    assert_one_sentence(info.value, "CXR-BERT", "config.json")
    save_file({"visual.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_colipri(tmp_path / "model.safetensors", ref["folder"])
    assert_one_sentence(info.value, "image_encoder.backbone.down_projection.proj.weight")


# ----------------------------------------------------------------------------- screening


def test_screening_with_small_colipri_gives_probabilities_and_maps(model: COLIPRIModel) -> None:
    from medalign.inference.screener import screen

    volume = synthetic_ct(shape_kji=(24, 40, 40), spacing=(2.0, 2.0, 2.5))
    before = volume.array.copy()
    result = screen(volume, findings=["Lung nodule", "Pleural effusion"], model=model, device="cpu")
    assert np.array_equal(volume.array, before)
    lo, hi = volume.ras_bounds()
    assert [f.name for f in result.findings] == ["Lung nodule", "Pleural effusion"]
    for f in result.findings:
        assert 0.0 <= f.probability <= 1.0 and np.isfinite(f.score)
        assert isinstance(f.map, Volume) and f.map.array.dtype == np.float32 and np.isfinite(f.map.array).all()
        mlo, mhi = f.map.ras_bounds()
        assert np.all(mlo >= lo - 1e-3) and np.all(mhi <= hi + 1e-3)
        assert np.all(np.sum(f.map.ijk_to_ras[:3, :3] * volume.ijk_to_ras[:3, :3], axis=0) > 0)
        assert np.abs(f.map.array).max() > 0
