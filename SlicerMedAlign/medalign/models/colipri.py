"""COLIPRI (Wald et al. 2026, Microsoft) as a ``ScreeningModel`` that loads ``microsoft/colipri``'s
``model.safetensors`` key for key.

Image: Primus-M (``primus.py``) on a 192³ crop at 2 mm in RAS -> 24³ patch embeddings (864-d)
-> a 1x1x1 Conv3d ``projector`` to 768-d -> attention pooling (``AttentionPool``, 12 heads,
query = mean token).  Text: CXR-BERT-specialized's BertModel (its own pooler dropped) ->
attention pooling over the valid tokens; no text projector.  Both pooled vectors are
L2-normalised; the official zero-shot pipeline softmaxes ``cos / softmax_temperature``
over the prompts it is given (no learned logit scale).

Local maps: the official "patch" image embeddings (``encode_image(project=True,
pool=False)``) pass the projected patches through the pooler's value and output
projections (``AttentionPool.dense``), which is what the pooled vector averages with the
attention weights; a token's logit is its cosine with the text over the temperature.
Our ``tokens`` are those, in the engine grid order (RAS x, y, z).

Sizes come from the tensors; the two that no shape fixes (Primus heads, input size) and the
poolers' head counts default to the published config and may be overridden by a
``config.json`` next to the weights (keys ``eva_numheads``, ``input_size``,
``image_pooler_num_heads``, ``text_pooler_num_heads``), so small test models run the same code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medalign.core.errors import CheckpointError, InputError
from medalign.models.base import ImageFeatures, ScreeningModel
from medalign.models.checkpoint_keys import check_state_keys, shapes
from medalign.models.ctclip import _first_line, _load_tokenizer, bert_config_for, read_state_dict
from medalign.models.primus import Primus, PrimusConfig
from medalign.models.profiles import COLIPRI as COLIPRI_PROFILE
from medalign.models.profiles import PreprocessProfile

FAMILY = "COLIPRI"
IMAGE_PREFIX = "image_encoder.backbone."
TEXT_PREFIX = "text_encoder.backbone."
MAX_TEXT_LENGTH = 512  # the official processor: max_length=512, truncation=True
CONFIG_KEYS = ("eva_numheads", "input_size", "image_pooler_num_heads", "text_pooler_num_heads")
# CXR-BERT-specialized, the text backbone the official config loads (trust_remote_code, this revision)
TEXT_ENCODER_REPO = "microsoft/BiomedVLP-CXR-BERT-specialized"
TEXT_ENCODER_REVISION = "5157bdba1437a3aed316dacb1a5b68edf96b9902"


@dataclass(frozen=True)
class COLIPRIConfig:
    """Sizes of a COLIPRI model (defaults: the published one)."""

    vision: PrimusConfig = PrimusConfig()
    projection_dim: int = 768
    image_pooler_heads: int = 12
    text_pooler_heads: int = 12

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], overrides: dict | None = None) -> COLIPRIConfig:
        """Sizes from tensor shapes plus ``overrides`` (the config.json keys) for what no shape holds."""
        over = overrides or {}
        size = int(over.get("input_size", 192))
        vision = PrimusConfig.from_state_dict(sd, IMAGE_PREFIX, int(over.get("eva_numheads", 12)), (size, size, size))
        key = "image_encoder.projector.weight"
        if key not in sd:
            raise CheckpointError(f"The {FAMILY} checkpoint has no '{key}' tensor, so it is not a {FAMILY} model.")
        config = cls(
            vision=vision, projection_dim=int(sd[key].shape[0]),
            image_pooler_heads=int(over.get("image_pooler_num_heads", 12)),
            text_pooler_heads=int(over.get("text_pooler_num_heads", 12)),
        )
        for heads in (config.image_pooler_heads, config.text_pooler_heads):
            if heads < 1 or config.projection_dim % heads:
                raise CheckpointError(f"{FAMILY} pooling with {heads} heads does not divide the width {config.projection_dim}.")
        return config


def read_overrides(weights: Path) -> dict:
    """The size keys of a ``config.json`` beside the weights ({} when there is none)."""
    path = weights.parent / "config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"The {FAMILY} config {path} could not be read ({_first_line(err)}).") from None
    picked = {k: raw[k] for k in CONFIG_KEYS if isinstance(raw, dict) and k in raw}
    bad = [k for k, v in picked.items() if not (isinstance(v, int) and not isinstance(v, bool) and v > 0)]
    if bad:
        raise CheckpointError(f"The {FAMILY} config {path} has non-positive-integer values for {', '.join(bad)}.")
    return picked


class AttentionPool(nn.Module):
    """COLIPRI's ``AttentionPool1D``: one query (the masked mean token) attends over the sequence."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D) tokens (and (B, N) mask of valid ones) -> (B, D)."""
        if attention_mask is None:
            query, padding = x.mean(dim=1, keepdim=True), None
        else:
            valid = attention_mask.to(device=x.device, dtype=torch.bool)
            if not bool(valid.any(dim=1).all()):
                raise InputError("Every text must keep at least one token after tokenisation.")
            weights = valid.unsqueeze(-1).to(x.dtype)
            query, padding = ((x * weights).sum(dim=1) / weights.sum(dim=1)).unsqueeze(1), ~valid
        pooled, _ = self.attn(query, x, x, key_padding_mask=padding, need_weights=False)
        return pooled[:, 0]

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> the pooler's value then output projection per token (official ``to_dense``)."""
        dim = x.shape[-1]
        value = F.linear(x, self.attn.in_proj_weight[2 * dim :], self.attn.in_proj_bias[2 * dim :])
        return self.attn.out_proj(value)


class ImageEncoder(nn.Module):
    def __init__(self, config: COLIPRIConfig) -> None:
        super().__init__()
        self.backbone = Primus(config.vision)
        self.projector = nn.Conv3d(config.vision.embed_dim, config.projection_dim, kernel_size=1)
        self.pooler = AttentionPool(config.projection_dim, config.image_pooler_heads)


class TextEncoder(nn.Module):
    def __init__(self, backbone: nn.Module, config: COLIPRIConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooler = AttentionPool(config.projection_dim, config.text_pooler_heads)


# ---------------------------------------------------------------------------- model


class COLIPRIModel(ScreeningModel):
    """COLIPRI with encode-once screening and per-token alignment maps.

    Native image layout = the engine grid: (B, 1, X, Y, Z) in RAS at 2 mm, values in [-1, 1].
    """

    family = "colipri"
    profile: PreprocessProfile = COLIPRI_PROFILE
    # the official model card's zero-shot example: "Lung nodules present" / "No lung nodules present"
    prompt_templates = {"positive": ["{finding} present"], "negative": ["No {finding} present"]}
    use_knowledge_prompts = True

    def __init__(self, config: COLIPRIConfig, text_backbone: nn.Module, tokenizer=None) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config)
        self.text_encoder = TextEncoder(text_backbone, config)
        self.register_buffer("softmax_temperature", torch.tensor(1.0))
        self.tokenizer = tokenizer
        self.patch_size = config.vision.patch_size
        if config.vision.input_size != COLIPRI_PROFILE.size:  # a smaller test model: same recipe, its own crop
            self.profile = dataclasses.replace(COLIPRI_PROFILE, size=config.vision.input_size)

    # ------------------------------------------------------------ loading
    @classmethod
    def from_state_dict(
        cls,
        sd: dict[str, torch.Tensor],
        text_encoder: str | Path | None,
        device: str | torch.device = "cpu",
        overrides: dict | None = None,
        source: str = "checkpoint",
    ) -> COLIPRIModel:
        """Build the model the tensors imply and load it strictly (one sentence for any mismatch)."""
        from transformers import BertModel

        if text_encoder is None:
            raise CheckpointError(
                f"{FAMILY} needs its text encoder folder (CXR-BERT-specialized: config.json and vocab.txt), but none was given."
            )
        folder = Path(text_encoder)
        if not folder.is_dir():
            raise CheckpointError(f"The {FAMILY} text encoder folder {folder} does not exist.")
        config = COLIPRIConfig.from_state_dict(sd, overrides)
        has_text = any(k.startswith(TEXT_PREFIX) for k in sd)
        bert_cfg = bert_config_for(folder, sd, has_text, prefix=TEXT_PREFIX, family=FAMILY)
        if has_text:
            bert = BertModel(bert_cfg, add_pooling_layer=False)
        else:
            try:
                bert = BertModel.from_pretrained(str(folder), config=bert_cfg, add_pooling_layer=False)
            except Exception as err:
                raise CheckpointError(f"The text encoder weights in {folder} could not be loaded ({_first_line(err)}).") from None
        if bert.config.hidden_size != config.projection_dim:
            raise CheckpointError(
                f"The text encoder in {folder} is {bert.config.hidden_size} wide but {FAMILY} pools {config.projection_dim}-d text."
            )
        tokenizer = _load_tokenizer(folder)
        if tokenizer is not None and len(tokenizer) > bert.config.vocab_size:
            raise CheckpointError(
                f"The tokenizer in {folder} has {len(tokenizer)} tokens but the text encoder only {bert.config.vocab_size}."
            )
        with torch.device("meta"):
            model = cls(config, bert, tokenizer)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if has_text or not k.startswith(TEXT_PREFIX)}
        pos = sd.get(TEXT_PREFIX + "embeddings.position_embeddings.weight")
        stale = {TEXT_PREFIX + "embeddings.position_ids": (1, pos.shape[0])} if pos is not None else {}
        check_state_keys(expected, shapes(sd), f"The {FAMILY} {source}", ignorable=stale)
        clean = {k: (sd[k].float() if sd[k].is_floating_point() else sd[k]) for k in expected}
        model.load_state_dict(clean, strict=has_text, assign=True)
        model.image_encoder.backbone.eva.reset_rope()  # built on the meta device above, and in no state dict
        return model.to(device).eval()

    # ------------------------------------------------------------ text
    @property
    def text_max_length(self) -> int:
        return min(MAX_TEXT_LENGTH, self.text_encoder.backbone.config.max_position_embeddings)

    def tokenize(self, texts: list[str], padding: str = "longest") -> dict[str, torch.Tensor]:
        """CXR-BERT tokenisation truncated at 512 tokens.

        The official processor pads every prompt to 512; padded positions are masked out in
        BERT and in the pooling, so ``"longest"`` gives the same latents far faster.
        """
        if self.tokenizer is None:
            raise CheckpointError(
                f"The {FAMILY} text encoder folder has no tokenizer (vocab.txt or tokenizer.json), so prompts cannot be tokenised."
            )
        enc = self.tokenizer(list(texts), return_tensors="pt", padding=padding, truncation=True, max_length=self.text_max_length)
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, L) tokens -> (N, 768) L2-normalised pooled text embeddings (no token_type_ids, as the original)."""
        hidden = self.text_encoder.backbone(input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.text_encoder.pooler(hidden, attention_mask), dim=1)

    def text_latents(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        texts = list(texts)
        parts = [self.encode_text(**self.tokenize(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, self.config.projection_dim, device=self.device)

    # ------------------------------------------------------------ image
    def image_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named intermediates for a (B, 1, X, Y, Z) image, channel-first like the original."""
        encoder = self.image_encoder
        patches = encoder.backbone(x)
        projected = encoder.projector(patches)
        sequence = projected.flatten(2).transpose(1, 2)  # (B, X*Y*Z, D), x-major
        pooled = encoder.pooler(sequence)
        dense = encoder.pooler.dense(sequence).transpose(1, 2).reshape(projected.shape)
        return {"patch_embeddings": patches, "projected": projected, "pooled": pooled, "dense": dense}

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) -> (B, 768) = official ``encode_image(project=True, pool=True, normalize=True)``."""
        encoder = self.image_encoder
        sequence = encoder.projector(encoder.backbone(x)).flatten(2).transpose(1, 2)
        return F.normalize(encoder.pooler(sequence), dim=1)

    def image_features(self, x: torch.Tensor) -> ImageFeatures:
        """Encode once: pooled latent (B, 768) and dense patch latents (B, X', Y', Z', 768), unnormalised."""
        out = self.image_outputs(x)
        return ImageFeatures(global_latent=out["pooled"], tokens=out["dense"].permute(0, 2, 3, 4, 1))

    # ------------------------------------------------------------ scores
    def logits(self, feats: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
        """(B, N) cos(image, text) / softmax_temperature: softmaxed over prompts, the official score."""
        image = F.normalize(feats.global_latent, dim=-1)
        return image @ F.normalize(text, dim=-1).T / self.softmax_temperature

    def token_logits(self, feats: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
        """(B, N, X', Y', Z') per-token cos(token, text) / softmax_temperature."""
        tokens = F.normalize(feats.tokens, dim=-1)
        return torch.einsum("bxyzd,nd->bnxyz", tokens, F.normalize(text, dim=-1)) / self.softmax_temperature


def checkpoint_layout(config: COLIPRIConfig, bert_config) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor a ``config`` checkpoint holds, built on the meta device (no memory)."""
    from transformers import BertModel

    with torch.device("meta"):
        model = COLIPRIModel(config, BertModel(bert_config, add_pooling_layer=False))
    return shapes(model.state_dict())


def load_colipri(weights: Path, text_encoder: str | Path | None, device: str = "cpu") -> COLIPRIModel:
    """Registry loader: ``microsoft/colipri``'s ``model.safetensors`` layout + a CXR-BERT folder."""
    weights = Path(weights)
    sd = read_state_dict(weights, family=FAMILY)
    return COLIPRIModel.from_state_dict(
        sd, text_encoder, device, overrides=read_overrides(weights), source=f"checkpoint {weights.name}"
    )


__all__ = ["COLIPRIConfig", "COLIPRIModel", "AttentionPool", "checkpoint_layout", "load_colipri", "read_overrides"]
