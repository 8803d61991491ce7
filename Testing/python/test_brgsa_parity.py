"""BrgSA family: checkpoint compatibility and numerical parity with the public BrgSA code.

The numbers come from ../shared/fixtures/brgsa_parity (the reference code run on a small
random-weight configuration); see its FACTS.md.  Tests that need it skip when it is absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from medalign.core.errors import CheckpointError, InputError, MedAlignError
from medalign.models import FAMILY_LOADERS, family_loader
from medalign.models.brgsa import (
    IGNORED_KEYS,
    BrgSAConfig,
    BrgSAModel,
    brgsa_config_from_state_dict,
    brgsa_prompt_text,
    build_brgsa,
    heatmap_volume_u8,
    load_brgsa,
)
from medalign.models.profiles import BRGSA

ATOL, RTOL = 1e-5, 1e-4


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fx(shared_fixtures: Path) -> Path:
    folder = shared_fixtures / "brgsa_parity"
    if not folder.is_dir():
        pytest.skip(f"needs {folder}; absent here")
    return folder


@pytest.fixture(scope="module")
def fx_config(fx: Path) -> dict:
    return json.loads((fx / "config.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def text_folder(fx_config: dict, tmp_path_factory) -> Path:
    """A BERT folder like CXR-BERT's, holding the fixture's small vocabulary and config."""
    folder = tmp_path_factory.mktemp("bert")
    (folder / "vocab.txt").write_text("\n".join(fx_config["vocab"]) + "\n")
    (folder / "config.json").write_text(json.dumps(fx_config["bert_config"]))
    return folder


@pytest.fixture(scope="module")
def inputs(fx: Path) -> dict[str, torch.Tensor]:
    return load_file(str(fx / "inputs.safetensors"))


@pytest.fixture(scope="module")
def expected(fx: Path) -> dict[str, torch.Tensor]:
    return load_file(str(fx / "expected.safetensors"))


@pytest.fixture(scope="module")
def prompts(fx_config: dict) -> list[str]:
    return [fx_config["prompts"][k][0] for k in sorted(fx_config["prompts"], key=int)]


@pytest.fixture(scope="module", params=["state_dict.pt", "state_dict.safetensors"])
def model(request, fx: Path, fx_config: dict, text_folder: Path) -> BrgSAModel:
    return load_brgsa(fx / request.param, text_folder, "cpu", vit_heads=fx_config["vit_config"]["num_heads"])


@pytest.fixture(scope="module")
def computed(model: BrgSAModel, inputs: dict) -> dict[str, torch.Tensor]:
    """Every fixture tensor, recomputed through our public API only."""
    image, ids, mask = inputs["image"], inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        img = model.image_embeddings(image)
        txt = model.text_embeddings(ids, mask, inputs["token_type_ids"])
        feats = model.image_features(image)
        text = model.encode_text(ids, mask)
        bank = model.dictionarylearning
        sim_global, sim_rec = model.brgsa_similarities(feats, text)
        patch_map = model.cosine_heatmap(feats, text)
        out = {
            "vit_cls_raw": img.cls,
            "vit_patch_raw": img.patches,
            "img_emb_g": img.global_emb,
            "img_emb_l": img.token_emb,
            "pos_embed_interp": model.img_encoder.model.position_table(img.grid),
            "text_emb_g": txt.sentence,
            "text_emb_l": txt.words,
            "img_bank_coeff": bank.coefficients(img.global_emb),
            "img_emb_g_rec": bank(img.global_emb),
            "text_bank_coeff": bank.coefficients(txt.sentence),
            "text_emb_g_rec": bank(txt.sentence),
            "sim_global": sim_global,
            "sim_rec": sim_rec,
            "zero_shot_scores": model.brgsa_scores(feats, text),
            "heatmap_cos_raw": model.token_logits(feats, text).flatten(2),
            "heatmap_cos_patch": patch_map,
            # the script resizes to (Z, Y, X) while the grid is X'-major (FACTS.md 9.1)
            "heatmap_cos_upsampled_u8": heatmap_volume_u8(patch_map, tuple(image.shape[-3:])[::-1]),
        }
    out["heatmap_gwar_patch"] = model.gwar_heatmap(image, text)
    return out


# --------------------------------------------------------------------------- parity
def test_every_fixture_tensor_is_recomputed(computed: dict, expected: dict) -> None:
    assert set(computed) == set(expected)


@pytest.mark.parametrize(
    "name",
    [
        "vit_cls_raw", "vit_patch_raw", "img_emb_g", "img_emb_l", "pos_embed_interp", "text_emb_g",
        "text_emb_l", "img_bank_coeff", "img_emb_g_rec", "text_bank_coeff", "text_emb_g_rec",
        "sim_global", "sim_rec", "zero_shot_scores", "heatmap_cos_raw", "heatmap_cos_patch",
    ],
)
def test_float_tensor_parity(name: str, computed: dict, expected: dict) -> None:
    got, want = computed[name], expected[name]
    assert got.shape == want.shape
    torch.testing.assert_close(got.float(), want, atol=ATOL, rtol=RTOL)


def test_gwar_heatmap_parity(computed: dict, expected: dict) -> None:
    got, want = computed["heatmap_gwar_patch"], expected["heatmap_gwar_patch"]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    # each map is a distribution over the patches
    torch.testing.assert_close(got.flatten(2).sum(-1), torch.ones(got.shape[:2]), atol=1e-4, rtol=0)


def test_uint8_heatmap_within_one_level(computed: dict, expected: dict) -> None:
    got, want = computed["heatmap_cos_upsampled_u8"], expected["heatmap_cos_upsampled_u8"]
    assert got.dtype == torch.uint8 and got.shape == want.shape
    assert (got.int() - want.int()).abs().max() <= 1


# --------------------------------------------------------------------------- prompts and tokens
def test_prompt_processing_matches_reference(prompts: list[str], fx_config: dict) -> None:
    assert [brgsa_prompt_text(p) for p in prompts] == fx_config["prompt_text_after_process_text"]


def test_prompt_processing_rules() -> None:
    # numbered-list marks and full stops split sentences; one-word sentences are dropped
    assert brgsa_prompt_text("1. Mild effusion. 2. Nodule.\nNo consolidation seen") == "mild effusion no consolidation seen"
    assert brgsa_prompt_text("Effusion") == ""
    assert brgsa_prompt_text("There is pleural effusión") == "there is pleural effusin"


def test_tokenize_matches_fixture_ids(model: BrgSAModel, prompts: list[str], inputs: dict) -> None:
    enc = model.tokenize(prompts)
    assert torch.equal(enc["input_ids"], inputs["input_ids"])
    assert torch.equal(enc["attention_mask"], inputs["attention_mask"])
    assert torch.equal(enc["token_type_ids"], inputs["token_type_ids"])


def test_text_latents_are_normalised_sentence_embeddings(model: BrgSAModel, prompts: list[str], expected: dict) -> None:
    with torch.no_grad():
        lat = model.text_latents(prompts)
    torch.testing.assert_close(lat, F.normalize(expected["text_emb_g"], dim=-1), atol=ATOL, rtol=RTOL)


def test_token_ids_without_sep_are_refused(model: BrgSAModel, inputs: dict) -> None:
    ids = inputs["input_ids"].clone()
    ids[ids == model.tokenizer.sep_token_id] = model.tokenizer.pad_token_id
    with pytest.raises(InputError):
        model.text_embeddings(ids, inputs["attention_mask"])


# --------------------------------------------------------------------------- screening surface
def test_screening_surface(model: BrgSAModel, inputs: dict, expected: dict) -> None:
    image = inputs["image"]
    assert model.family == "brgsa" and model.profile is BRGSA
    assert model.patch_size == (16, 16, 8)
    assert torch.equal(model.input_from_grid(image), image)
    assert model.prompt_templates["positive"] == ["There is {finding}"]
    with torch.no_grad():
        feats = model.image_features(image)
        text = F.normalize(expected["text_emb_g"], dim=-1)
        logits = model.logits(feats, text)
        tok = model.token_logits(feats, text)
        enc = model.encode_image(image)
    assert feats.tokens.shape == (2, 4, 4, 4, 64)
    torch.testing.assert_close(enc, F.normalize(expected["img_emb_g"], dim=-1), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(logits, model.logit_scale * expected["zero_shot_scores"], atol=1e-4, rtol=RTOL)
    assert model.logit_scale == 10.0  # temp3 from the checkpoint's hyper_parameters
    # token grid order = conv order (X' slowest): token (a, b, c) is flat index a*16 + b*4 + c
    torch.testing.assert_close(tok.flatten(2), expected["heatmap_cos_raw"], atol=ATOL, rtol=RTOL)
    # a pos/neg softmax of the logits is the softmax of scaled score differences
    prob = torch.softmax(logits[:, :2], dim=1)[:, 0]
    diff = expected["zero_shot_scores"][:, 0] - expected["zero_shot_scores"][:, 1]
    torch.testing.assert_close(prob, torch.sigmoid(10.0 * diff), atol=1e-5, rtol=0)


def test_family_registered() -> None:
    assert FAMILY_LOADERS["brgsa"] == "medalign.models.brgsa:load_brgsa"
    assert family_loader("brgsa") is load_brgsa


# --------------------------------------------------------------------------- loading variants
def _flat(fx: Path) -> dict[str, torch.Tensor]:
    return load_file(str(fx / "state_dict.safetensors"))


def test_heads_from_safetensors_metadata(fx: Path, text_folder: Path, inputs: dict, expected: dict, tmp_path: Path) -> None:
    path = tmp_path / "with_meta.safetensors"
    save_file(_flat(fx), str(path), metadata={"hyper_parameters": json.dumps({"model": {"vision": {"num_heads": 2}}})})
    m = load_brgsa(path, text_folder, "cpu")
    assert m.cfg.vit.heads == 2
    with torch.no_grad():
        torch.testing.assert_close(m.image_embeddings(inputs["image"]).global_emb, expected["img_emb_g"], atol=ATOL, rtol=RTOL)
    # without the head count, width / 64 = 1 head is assumed, and the numbers differ
    m1 = load_brgsa(fx / "state_dict.safetensors", text_folder, "cpu")
    assert m1.cfg.vit.heads == 1
    with torch.no_grad():
        assert not torch.allclose(m1.image_embeddings(inputs["image"]).global_emb, expected["img_emb_g"], atol=1e-3)


def test_plain_state_dict_pt_and_ignored_buffers(fx: Path, text_folder: Path, tmp_path: Path) -> None:
    state = {k.removeprefix("gloria."): v for k, v in _flat(fx).items()}  # no prefix, no Lightning nesting
    state["text_encoder.model.embeddings.position_ids"] = torch.arange(128).unsqueeze(0)  # old transformers
    assert "text_encoder.model.embeddings.position_ids" in IGNORED_KEYS
    path = tmp_path / "plain.pt"
    torch.save(state, path)
    m = load_brgsa(path, text_folder, "cpu", vit_heads=2)
    assert m.cfg.word_num == 97 and m.cfg.bank_size == 32 and m.cfg.vit.base_size == (48, 48, 24)
    assert not any(b.is_meta for b in m.buffers()) and not any(p.is_meta for p in m.parameters())


def test_without_text_folder_images_work_but_prompts_need_it(fx: Path, inputs: dict) -> None:
    m = load_brgsa(fx / "state_dict.safetensors", None, "cpu", vit_heads=2)
    with torch.no_grad():
        assert m.encode_image(inputs["image"]).shape == (2, 64)
    with pytest.raises(CheckpointError, match="--text-encoder"):
        m.tokenize(["There is Cardiomegaly"])


def test_full_size_layout_matches_published_config(fx: Path) -> None:
    layout = json.loads((fx / "full_size_layout.json").read_text(encoding="utf-8"))
    shapes = {k["key"]: tuple(k["shape"]) for k in layout["keys"]}
    assert len(shapes) == layout["num_keys"] == 358
    meta_state = {k.removeprefix("gloria."): torch.empty(s, device="meta") for k, s in shapes.items()}
    cfg = brgsa_config_from_state_dict(meta_state, bert_config=layout["bert_config"])
    assert cfg == BrgSAConfig.published()
    with torch.device("meta"):
        model = BrgSAModel(BrgSAConfig.published())
    ours = {"gloria." + k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == shapes
    assert sum(p.numel() for p in model.parameters()) == layout["num_params"]
    built = build_brgsa(cfg, meta_state)  # the strict key/shape check accepts the full layout
    assert built.cfg.vit.base_grid == (14, 14, 14)


# --------------------------------------------------------------------------- error paths
def _save_variant(fx: Path, tmp_path: Path, edit) -> Path:
    state = _flat(fx)
    edit(state)
    path = tmp_path / "variant.safetensors"
    save_file(state, str(path))
    return path


def _one_sentence(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.endswith(".")
    return msg


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda s: s.pop("gloria.img_encoder.model.norm.weight"), "missing keys img_encoder.model.norm.weight"),
        (
            lambda s: s.pop("gloria.text_encoder.model.encoder.layer.2.output.dense.bias"),
            "text_encoder.model.encoder.layer.2.output.dense.bias",
        ),
        (lambda s: s.pop("gloria.dictionarylearning.dictionary.weight"), "dictionarylearning.dictionary.weight"),
        (
            lambda s: s.update({"gloria.img_encoder.extra_head.weight": torch.zeros(2, 2)}),
            "unexpected keys img_encoder.extra_head.weight",
        ),
        (
            lambda s: s.update({"gloria.img_encoder.model.blocks.1.mlp.fc2.weight": torch.zeros(64, 128)}),
            "wrong shapes img_encoder.model.blocks.1.mlp.fc2.weight [64, 128] (expected [64, 256])",
        ),
    ],
    ids=["missing", "missing-bert", "missing-needed-for-sizes", "unexpected", "wrong-shape"],
)
def test_mismatched_checkpoint_names_the_keys(fx: Path, text_folder: Path, tmp_path: Path, edit, key: str) -> None:
    path = _save_variant(fx, tmp_path, edit)
    with pytest.raises(CheckpointError) as exc:
        load_brgsa(path, text_folder, "cpu", vit_heads=2)
    assert key in _one_sentence(exc)


@pytest.mark.parametrize("name", ["state_dict.pt", "state_dict.safetensors"])
def test_truncated_file(fx: Path, tmp_path: Path, name: str) -> None:
    data = (fx / name).read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc:
        load_brgsa(path, None, "cpu")
    assert "not a readable weight file" in _one_sentence(exc)


@pytest.mark.parametrize(
    "content",
    [b"this is a radiology report, not weights\n", json.dumps({"weights": [1, 2, 3]}).encode(), b""],
    ids=["text", "json", "empty"],
)
def test_non_weights_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as exc:
        load_brgsa(path, None, "cpu")
    _one_sentence(exc)


def test_container_without_tensors(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="state dict of tensors"):
        load_brgsa(path, None, "cpu")


class _Payload:
    """Stands for OmegaConf's DictConfig: unpickling it would run code of the file's choosing."""

    marker: Path

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_python_objects_are_never_unpickled(fx: Path, tmp_path: Path) -> None:
    payload = _Payload()
    payload.marker = tmp_path / "code_ran"
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": _flat(fx), "hyper_parameters": payload}, path)
    with pytest.raises(CheckpointError) as exc:
        load_brgsa(path, None, "cpu")
    msg = _one_sentence(exc)
    assert "os.makedirs" in msg and ".safetensors" in msg
    assert not payload.marker.exists()


def test_missing_weight_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_brgsa(tmp_path / "absent.ckpt", None, "cpu")


def test_text_folder_problems(fx: Path, fx_config: dict, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a folder"):
        load_brgsa(fx / "state_dict.safetensors", tmp_path / "nowhere", "cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="vocab.txt"):
        load_brgsa(fx / "state_dict.safetensors", empty, "cpu")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "vocab.txt").write_text("\n".join(fx_config["vocab"]) + "\n")
    (wrong / "config.json").write_text(json.dumps(dict(fx_config["bert_config"], hidden_size=768)))
    with pytest.raises(CheckpointError, match="hidden_size 768") as exc:
        load_brgsa(fx / "state_dict.safetensors", wrong, "cpu")
    _one_sentence(exc)
    big = tmp_path / "big"
    big.mkdir()
    (big / "vocab.txt").write_text("\n".join(fx_config["vocab"] + [f"extra{i}" for i in range(10)]) + "\n")
    with pytest.raises(CheckpointError, match="wrong text-encoder folder"):
        load_brgsa(fx / "state_dict.safetensors", big, "cpu", vit_heads=2)


def test_errors_are_medalign_errors() -> None:
    assert issubclass(CheckpointError, MedAlignError) and issubclass(InputError, MedAlignError)
