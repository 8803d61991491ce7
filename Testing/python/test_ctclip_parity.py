"""CT-CLIP: numbers identical to the public reference, strict checkpoint loading, exact token maps.

The parity half uses ../shared/fixtures/ctclip_parity (random-weight outputs of the
reference code, see its config.json for how each tensor was computed) and skips without
it.  The other half builds a tiny deterministic CT-CLIP here (tokenizer included), so the
loader, tokenisation and map arithmetic are tested on any checkout.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import assert_one_sentence

from medalign.core.errors import CheckpointError, InputError
from medalign.models import FAMILY_LOADERS, family_loader
from medalign.models.ctclip import (
    CTCLIPConfig,
    CTCLIPModel,
    bert_config_for,
    checkpoint_layout,
    load_ctclip,
    match_state_dict,
)
from medalign.models.ctvit import CTViTConfig
from medalign.models.profiles import CTCLIP as CTCLIP_PROFILE

ATOL = 1e-4



# ----------------------------------------------------------------------------- fixture set A


@pytest.fixture(scope="module")
def fx(shared_fixtures: Path) -> Path:
    path = shared_fixtures / "ctclip_parity"
    if not (path / "expected.safetensors").is_file():
        pytest.skip(f"needs {path} (CT-CLIP parity fixture); absent here")
    return path


@pytest.fixture(scope="module")
def fx_config(fx: Path) -> dict:
    return json.loads((fx / "config.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def fx_bert_folder(fx_config: dict, tmp_path_factory) -> Path:
    """The fixture's BERT config as a text-encoder folder (it has no tokenizer)."""
    folder = tmp_path_factory.mktemp("fx_bert")
    (folder / "config.json").write_text(json.dumps(fx_config["bert_config_full"]))
    return folder


@pytest.fixture(scope="module")
def fx_io(fx: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return load_file(str(fx / "inputs.safetensors")), load_file(str(fx / "expected.safetensors"))


@pytest.fixture(scope="module")
def fx_sd(fx: Path) -> dict[str, torch.Tensor]:
    return torch.load(fx / "state_dict.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module", params=["state_dict.pt", "state_dict.safetensors"])
def fx_model(request, fx: Path, fx_bert_folder: Path) -> CTCLIPModel:
    return family_loader("ct-clip")(fx / request.param, fx_bert_folder, "cpu")


def reference_outputs(model: CTCLIPModel, inputs: dict) -> dict[str, torch.Tensor]:
    """Every expected tensor, computed through our public surface (config.json's recipes)."""
    image, ids, mask = inputs["image"], inputs["input_ids"], inputs["attention_mask"]
    with torch.inference_mode():
        out = {**model.image_outputs(image), **model.text_outputs(ids, mask)}
        feats = model.image_features(image)
        text = model.encode_text(ids, mask)
        logits = model.logits(feats, text)
        # zero_shot.py pattern: one image against "<finding> is present." / "... is not present."
        zero = model.logits(model.image_features(image[:1]), model.encode_text(ids[:2], mask[:2]))[0]
        b = image.shape[0]
        paired = model.logits(feats, model.encode_text(ids[:b], mask[:b])).diagonal()
    out.update(
        logit_scale=model.logit_scale.detach(),
        logits=logits,
        logits_per_text=logits.T,
        zeroshot_logits=zero,
        zeroshot_probs=zero.softmax(dim=0),
        paired_logits=paired,
    )
    return out


def test_fixture_matches_reference(fx_model: CTCLIPModel, fx_io, fx_config: dict) -> None:
    inputs, expected = fx_io
    got = reference_outputs(fx_model, inputs)
    assert set(expected) == set(fx_config["expected_tensors"])
    missing = set(expected) - set(got)
    assert not missing, f"no recipe for expected tensors {missing}"
    for name, want in expected.items():
        have = got[name]
        assert tuple(have.shape) == tuple(want.shape), name
        if want.dtype == torch.int64:
            assert torch.equal(have, want), f"{name}: codebook indices differ"
        else:
            err = (have.double() - want.double()).abs().max().item()
            assert err <= ATOL, f"{name}: max abs diff {err:.3g} > {ATOL}"


def test_fixture_sizes_read_from_shapes(fx_model: CTCLIPModel, fx_config: dict) -> None:
    kw = fx_config["ctvit_kwargs_given"]
    cfg = fx_model.config
    assert cfg.vision.dim == kw["dim"] and cfg.vision.codebook_size == kw["codebook_size"]
    assert cfg.vision.patch_size == (kw["patch_size"],) * 2
    assert cfg.vision.temporal_patch_size == kw["temporal_patch_size"]
    assert (cfg.vision.spatial_depth, cfg.vision.temporal_depth) == (kw["spatial_depth"], kw["temporal_depth"])
    assert (cfg.vision.heads, cfg.vision.dim_head) == (kw["heads"], kw["dim_head"])
    assert cfg.image_hw == (kw["image_size"],) * 2
    head = fx_config["ctclip_kwargs_given"]
    assert (cfg.dim_image, cfg.dim_text, cfg.dim_latent) == (head["dim_image"], head["dim_text"], head["dim_latent"])
    assert fx_model.patch_size == (kw["patch_size"], kw["patch_size"], kw["temporal_patch_size"])
    assert fx_model.training is False


def test_fixture_token_maps_add_up_to_logits(fx_model: CTCLIPModel, fx_io) -> None:
    inputs, expected = fx_io
    with torch.inference_mode():
        feats = fx_model.image_features(inputs["image"])
        text = fx_model.encode_text(inputs["input_ids"], inputs["attention_mask"])
        maps = fx_model.token_logits(feats, text)
        codes = fx_model.image_outputs(inputs["image"])["encoded_tokens"]
        weight = fx_model.to_visual_latent.weight.detach()
    assert maps.shape == (2, 3, 8, 8, 8)
    torch.testing.assert_close(feats.tokens.sum(dim=(1, 2, 3)), feats.global_latent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps.sum(dim=(2, 3, 4)), expected["logits"], atol=1e-5, rtol=1e-5)
    # token (x, y, z) of the grid is native token (t=z, h=x, w=y): check one asymmetric token by hand
    b, x, y, z = 1, 5, 2, 6
    t_count, h, w = codes.shape[1:4]
    by_hand = weight.view(-1, h, w, codes.shape[-1])[:, x, y, :] @ codes[b, z, x, y] / t_count
    torch.testing.assert_close(feats.tokens[b, x, y, z], by_hand, atol=1e-6, rtol=1e-5)


def test_fixture_grid_input_gives_same_latent(fx_model: CTCLIPModel, fx_io) -> None:
    inputs, expected = fx_io
    native = inputs["image"]  # (B, 1, Z, X, Y)
    grid = native.permute(0, 1, 3, 4, 2)  # what the engine hands over: (B, 1, X, Y, Z)
    back = fx_model.input_from_grid(grid)
    assert torch.equal(back, native)
    with torch.inference_mode():
        latent = fx_model.encode_image(back)
    torch.testing.assert_close(latent, expected["image_latent"], atol=ATOL, rtol=0)


def test_fixture_stale_position_ids_tolerated(fx_sd, fx_bert_folder: Path, fx_io) -> None:
    inputs, expected = fx_io
    sd = dict(fx_sd)
    sd["text_transformer.embeddings.position_ids"] = torch.arange(40).unsqueeze(0)
    model = CTCLIPModel.from_state_dict(sd, fx_bert_folder)
    with torch.inference_mode():
        latent = model.encode_text(inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(latent, expected["text_latent"], atol=ATOL, rtol=0)
    assert not any("extra" in k or "first_frame" in k or "null_kv" in k for k in model.state_dict())


@pytest.mark.parametrize(
    "edit, kind, key",
    [
        ("drop", "missing", "visual_transformer.enc_temporal_transformer.norm_out.gamma"),
        ("drop", "missing", "text_transformer.encoder.layer.1.output.dense.bias"),
        ("drop", "no '", "visual_transformer.to_patch_emb.2.weight"),  # a size-defining key
        ("add", "unexpected", "visual_transformer.dec_spatial_transformer.norm_out.gamma"),
        ("shape", "wrong shapes", "visual_transformer.enc_temporal_transformer.layers.0.1.q_scale"),
        ("shape", "wrong shapes", "to_visual_latent_extra.weight"),  # dropped keys are still checked
        ("null_kv", "wrong shapes", "visual_transformer.enc_spatial_transformer.layers.0.1.null_kv"),
    ],
)
def test_fixture_bad_checkpoints(fx_sd, fx_bert_folder: Path, edit: str, kind: str, key: str) -> None:
    sd = dict(fx_sd)
    if edit == "drop":
        del sd[key]
    elif edit == "add":
        sd[key] = torch.ones(64)
    elif edit == "shape":
        sd[key] = torch.ones(*[s + 1 for s in sd[key].shape])
    else:  # one null key/value pair would change every attention output
        sd[key] = torch.ones(2, 2, 16)
    with pytest.raises(CheckpointError) as info:
        CTCLIPModel.from_state_dict(sd, fx_bert_folder)
    assert_one_sentence(info.value, kind, key)


def test_fixture_truncated_and_unsafe_files(fx: Path, fx_bert_folder: Path, tmp_path: Path) -> None:
    for name in ("state_dict.pt", "state_dict.safetensors"):
        data = (fx / name).read_bytes()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError) as info:
            load_ctclip(cut, fx_bert_folder)
        assert_one_sentence(info.value, cut.name, "truncated")
    with pytest.raises(CheckpointError) as info:
        load_ctclip(tmp_path / "absent.pt", fx_bert_folder)
    assert_one_sentence(info.value, "does not exist")


def test_fixture_needs_text_folder_and_tokenizer(fx: Path, fx_bert_folder: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        load_ctclip(fx / "state_dict.pt", None)
    assert_one_sentence(info.value, "text encoder folder")
    model = load_ctclip(fx / "state_dict.pt", fx_bert_folder)
    with pytest.raises(CheckpointError) as info:
        model.tokenize(["Emphysema is present."])
    assert_one_sentence(info.value, "tokenizer")


def test_full_size_layout_is_what_the_model_expects(fx: Path, tmp_path: Path) -> None:
    layout = json.loads((fx / "full_size_layout.json").read_text(encoding="utf-8"))
    assert layout["num_state_dict_keys"] == len(layout["keys"]) == 361
    meta_sd = {e["key"]: torch.empty(e["shape"], device="meta") for e in layout["keys"]}
    config = CTCLIPConfig.from_state_dict(meta_sd)
    assert config == CTCLIPConfig(vision=CTViTConfig(), token_hw=(24, 24), dim_latent=512, dim_text=768)
    folder = tmp_path / "cxr_bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "cxr-bert", "num_attention_heads": 12}))
    bert_cfg = bert_config_for(folder, meta_sd)
    bc = layout["bert_config"]
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings"):
        assert getattr(bert_cfg, field) == bc[field], field
    kept = checkpoint_layout(config, bert_cfg)
    dropped = config.droppable_keys(meta_sd)
    shapes = {e["key"]: tuple(e["shape"]) for e in layout["keys"]}
    assert set(kept) | (set(dropped) & set(shapes)) == set(shapes)
    assert not set(kept) & set(dropped)
    for key, shape in shapes.items():
        assert kept.get(key, dropped.get(key)) == shape, key
    # published files also carry the stale position_ids buffer (transformers < 4.31)
    with_ids = dict(meta_sd, **{"text_transformer.embeddings.position_ids": torch.empty(1, 512, device="meta")})
    assert set(match_state_dict(kept, with_ids, config.droppable_keys(with_ids))) == set(kept)
    # what the model keeps: no decoder, first-frame branch or CLOOB copies (a 151 M-weight saving)
    # 6 first-frame + 4 pixel-decoder + 2 VQ training-state tensors, 3 per attention block (8), 2 CLOOB copies
    assert len(set(dropped) & set(shapes)) == 6 + 4 + 2 + 3 * 8 + 2
    assert sum(math_prod(s) for s in kept.values()) < layout["total_state_dict_numel"] - 150_000_000


def math_prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ----------------------------------------------------------------------------- tiny model here

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "lung", "nodule", "is", "not", "present", ".", "emphysema", "##s"]


def _tiny_config() -> CTCLIPConfig:
    vision = CTViTConfig(
        dim=32, codebook_size=16, patch_size=(4, 4), temporal_patch_size=2, spatial_depth=1, temporal_depth=2,
        heads=2, dim_head=8, ff_inner=int(4 * 2 / 3 * 32),
    )
    return CTCLIPConfig(vision=vision, token_hw=(3, 3), dim_latent=16, dim_text=24)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A deterministic tiny CT-CLIP saved as a CT-CLIP-layout checkpoint plus a BERT folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("tiny_ctclip")
    folder = root / "bert"
    folder.mkdir()
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(str(root / "vocab.txt"), do_lower_case=True).save_pretrained(str(folder))
    bert_cfg = BertConfig(
        vocab_size=len(VOCAB), hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=48,
        max_position_embeddings=64, initializer_range=0.2,
    )
    bert_cfg.save_pretrained(str(folder))
    torch.manual_seed(0)
    model = CTCLIPModel(_tiny_config(), BertModel(bert_cfg))
    with torch.no_grad():
        model.visual_transformer.vq._codebook.embed.normal_()
        model.temperature.fill_(2.0)
    sd = model.state_dict()
    # a CT-CLIP-layout file also holds the tensors inference drops (the first-frame branch
    # is where the spatial patch size is read from)
    extra = {k: torch.full(shape, 0.5) for k, shape in model.config.droppable_keys(sd).items()}
    extra["text_transformer.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    file_sd = {**sd, **extra}
    torch.save(file_sd, root / "tiny.pt")
    model.text_transformer.save_pretrained(str(folder))  # for the "text weights from the folder" path
    return {"root": root, "folder": folder, "sd": sd, "file_sd": file_sd}


@pytest.fixture(scope="module")
def tiny_model(tiny: dict) -> CTCLIPModel:
    return load_ctclip(tiny["root"] / "tiny.pt", tiny["folder"])


def _tiny_image(batch: int = 2) -> torch.Tensor:
    """Deterministic native image (B, 1, D=6, H=12, W=12) in [-1, 1]."""
    d, h, w = 6, 12, 12
    zz, yy, xx = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
    base = torch.sin(0.7 * xx + 0.3 * yy) * torch.cos(0.5 * zz - 0.2 * xx)
    return torch.stack([base * (1 - 0.3 * b) for b in range(batch)]).unsqueeze(1).float()


def test_registered_family() -> None:
    assert FAMILY_LOADERS["ct-clip"] == "medalign.models.ctclip:load_ctclip"
    assert family_loader("ct-clip") is load_ctclip
    assert CTCLIPModel.prompt_templates == {"positive": ["{finding} is present."], "negative": ["{finding} is not present."]}
    assert CTCLIPModel.family == "ct-clip" and CTCLIPModel.profile is CTCLIP_PROFILE
    assert CTCLIP_PROFILE.size == (480, 480, 240)


def test_tiny_round_trip_and_profile(tiny: dict, tiny_model: CTCLIPModel) -> None:
    assert tiny_model.config == _tiny_config()
    assert tiny_model.patch_size == (4, 4, 2)
    assert tiny_model.profile.size[:2] == (12, 12) and tiny_model.profile.size[2] % 2 == 0
    assert tiny_model.token_layout() == ((4, 4, 2), (1.5, 1.5, 0.5))
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, tiny["sd"][key]), key


def test_tiny_tokenize(tiny_model: CTCLIPModel) -> None:
    ids = {t: i for i, t in enumerate(VOCAB)}
    enc = tiny_model.tokenize(["Lung nodule is present.", "Emphysemas is NOT present."])
    want0 = [ids[t] for t in ("[CLS]", "lung", "nodule", "is", "present", ".", "[SEP]", "[PAD]")]
    want1 = [ids[t] for t in ("[CLS]", "emphysema", "##s", "is", "not", "present", ".", "[SEP]")]
    assert enc["input_ids"].shape == (2, 8)
    assert enc["input_ids"][0].tolist() == want0
    assert enc["input_ids"][1].tolist() == want1
    assert enc["attention_mask"].tolist() == [[1] * 7 + [0], [1] * 8]
    long = tiny_model.tokenize([" ".join(["lung"] * 200)], padding="max_length")
    assert long["input_ids"].shape == (1, tiny_model.text_max_length) == (1, 64)
    assert long["input_ids"][0, -1].item() == ids["[SEP]"]


def test_tiny_padding_to_max_length_changes_nothing(tiny_model: CTCLIPModel) -> None:
    prompts = ["Lung nodule is present.", "Lung nodule is not present."]
    with torch.inference_mode():
        short = tiny_model.encode_text(**tiny_model.tokenize(prompts))
        full = tiny_model.encode_text(**tiny_model.tokenize(prompts, padding="max_length"))
        latents = tiny_model.text_latents(prompts)
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(latents, short)
    torch.testing.assert_close(latents.norm(dim=-1), torch.ones(2))
    assert (short[0] - short[1]).abs().max() > 1e-3  # negation changes the latent


def test_tiny_text_weights_from_folder(tiny: dict, tiny_model: CTCLIPModel, tmp_path: Path) -> None:
    image_only = {k: v for k, v in tiny["file_sd"].items() if not k.startswith("text_transformer.")}
    torch.save(image_only, tmp_path / "image_only.pt")
    model = load_ctclip(tmp_path / "image_only.pt", tiny["folder"])
    prompts = ["Emphysema is present."]
    with torch.inference_mode():
        torch.testing.assert_close(model.text_latents(prompts), tiny_model.text_latents(prompts))


def test_tiny_screening_surface(tiny_model: CTCLIPModel) -> None:
    native = _tiny_image()
    grid = native.permute(0, 1, 3, 4, 2).contiguous()
    assert torch.equal(tiny_model.input_from_grid(grid), native)
    with torch.inference_mode():
        feats = tiny_model.image_features(tiny_model.input_from_grid(grid))
        text = tiny_model.text_latents(["Lung nodule is present.", "Lung nodule is not present.", "Emphysema is present."])
        logits = tiny_model.logits(feats, text)
        maps = tiny_model.token_logits(feats, text)
        single = tiny_model.logits(tiny_model.image_features(native[1:]), text)
    assert feats.global_latent.shape == (2, 16) and feats.tokens.shape == (2, 3, 3, 3, 16)
    assert maps.shape == (2, 3, 3, 3, 3)
    torch.testing.assert_close(maps.sum(dim=(2, 3, 4)), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats.tokens.sum(dim=(1, 2, 3)), feats.global_latent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single, logits[1:], atol=1e-5, rtol=1e-5)  # batching does not mix images
    cos = torch.nn.functional.normalize(feats.global_latent, dim=-1) @ text.T
    torch.testing.assert_close(logits, cos * torch.tensor(2.0).exp())
    with pytest.raises(InputError) as info:
        tiny_model.encode_image(torch.zeros(1, 1, 6, 12, 16))
    assert_one_sentence(info.value, "12 x 12")


def test_a_non_square_token_grid_takes_its_image_size_from_a_config_beside_the_weights(tiny: dict, tmp_path) -> None:
    """A 2 x 3 token grid per slab (8 x 12 voxel slices) was refused as "not square"."""
    from transformers import BertConfig, BertModel

    config = dataclasses.replace(_tiny_config(), token_hw=(2, 3))
    torch.manual_seed(1)
    model = CTCLIPModel(config, BertModel(BertConfig.from_pretrained(str(tiny["folder"])))).eval()
    sd = model.state_dict()
    extra = {k: torch.full(shape, 0.5) for k, shape in config.droppable_keys(sd).items()}
    weights = tmp_path / "wide.pt"
    torch.save({**sd, **extra}, weights)

    with pytest.raises(CheckpointError, match=r"not a square token grid .*config\.json beside the weights"):
        load_ctclip(weights, tiny["folder"])
    (tmp_path / "config.json").write_text(json.dumps({"image_size": [8, 11]}))
    with pytest.raises(CheckpointError, match=r"image size 8 x 11 does not fit"):
        load_ctclip(weights, tiny["folder"])
    (tmp_path / "config.json").write_text(json.dumps({"image_size": [8, 12]}))
    loaded = load_ctclip(weights, tiny["folder"])
    assert loaded.config.token_hw == (2, 3) and loaded.profile.size[:2] == (8, 12)
    image = _tiny_image(1)[..., :8, :12]
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(image), model.encode_image(image), atol=1e-6)
