"""Merlin (Blankemeier, Kumar et al., Nature 2026) as a ``ScreeningModel`` loading the published checkpoint.

Merlin = I3ResNet-152 image encoder (``i3resnet.py``) whose average-pooled last feature map
goes through a 1x1x1 "contrastive head" (2048 -> 512, with bias) + Clinical-Longformer
(``transformers.LongformerModel``) whose first token goes through a linear 768 -> 512;
both sides are L2-normalised (``merlin-vlm``'s ``MerlinArchitecture.forward``).  A 1692-way
phenotype head shares the pooled features.

Local maps are exact: the head is linear on the *mean* of the N feature positions, so

    latent = W mean_v f(v) + b = sum_v c(v),   c(v) = (W f(v) + b) / N,

and the per-position logits ``scale * c(v) . t / |latent|`` add up to the finding's logit
(the bias split evenly over positions; a class-activation-map decomposition).

The score scale: ``merlin-vlm`` stores a ``logit_scale`` (initialised to 1.0) but no official
code path applies it (its forward returns normalised embeddings only), and its training
code that would say whether it is a raw multiplier or a log-temperature is not public.  So
it is accepted and shape-checked, never used, and the logit is cosine x ``LOGIT_SCALE`` =
1/0.07, the CLIP temperature contrastive training starts from: it only sets how sharp the
positive-vs-negative prompt probability is (rankings and AUCs do not depend on it), and a
fitted calibration replaces it per finding.

Checkpoint layout (the published ``i3_resnet_clinical_longformer_best_clip_*.pt``, a plain
state dict): ``encode_image.i3_resnet.*``, ``encode_text.text_encoder.*`` (Longformer incl.
pooler), ``encode_text.linear_layer.*``, ``logit_scale``.  Our module names differ (the
surface already has ``encode_image``/``encode_text`` methods), so keys are renamed by prefix
on load; every key must be present with its shape, except the droppable ones (``logit_scale``
and the stale ``position_ids`` buffer of old transformers versions).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medalign.core.errors import CheckpointError, InputError
from medalign.models.base import ImageFeatures, ScreeningModel
from medalign.models.checkpoint_keys import check_state_keys, shapes
from medalign.models.ctclip import _first_line, read_state_dict
from medalign.models.i3resnet import I3ResNet, I3ResNetConfig
from medalign.models.pooled_scores import scaled_cosine_logits, token_shares
from medalign.models.profiles import MERLIN as MERLIN_PROFILE
from medalign.models.profiles import PreprocessProfile

# published prefix -> our module prefix
KEY_PREFIXES = {
    "encode_image.i3_resnet.": "image_encoder.",
    "encode_text.text_encoder.": "text_encoder.",
    "encode_text.linear_layer.": "text_projection.",
}
IMAGE_PREFIX, TEXT_PREFIX, _ = KEY_PREFIXES
MAX_TEXT_LENGTH = 1024  # Merlin's tokenizer call: padding=True, truncation=True, max_length=1024
LOGIT_SCALE = 1.0 / 0.07  # see the module docstring
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
CONVERT_HINT = (
    "python -c \"import torch, safetensors.torch as s; s.save_file({k: v.contiguous() for k, v in "
    "torch.load('IN.pt', weights_only=False).items() if torch.is_tensor(v)}, 'OUT.safetensors')\""
)


def sanitize_report(text: str) -> str:
    """Merlin's text normalisation: lower case, then NLTK's ``wordpunct_tokenize`` joined by
    spaces (runs of word characters and runs of other non-space characters)."""
    return " ".join(re.findall(r"\w+|[^\w\s]+", text.lower()))


def read_merlin_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain tensor state dict from safetensors or a torch file read with ``weights_only=True``.

    Merlin publishes a ``.pt`` pickle; anything in it beyond tensors is refused (never
    unpickled), with the one-line conversion a user can run on a file they trust.
    """
    return read_state_dict(path, family="Merlin", convert_hint=CONVERT_HINT)


def to_published(key: str) -> str:
    """Our parameter name -> the published checkpoint's."""
    for theirs, ours in KEY_PREFIXES.items():
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    return key


def from_published(key: str) -> str:
    for theirs, ours in KEY_PREFIXES.items():
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return key


def longformer_config_for(folder: Path, sd: dict[str, torch.Tensor]):
    """LongformerConfig from the folder's config.json, every size the checkpoint fixes taken from it.

    Heads, attention windows and the padding id cannot be read from tensor shapes.
    """
    from transformers import LongformerConfig

    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"The Merlin text encoder folder {folder} has no readable config.json ({_first_line(err)}).") from None
    raw = {k: v for k, v in raw.items() if k not in ("architectures", "auto_map")}
    cfg = LongformerConfig.from_dict(raw)

    def shape(key: str) -> tuple[int, ...]:
        if TEXT_PREFIX + key not in sd:
            raise CheckpointError(f"The Merlin checkpoint has no '{TEXT_PREFIX + key}' tensor (Clinical-Longformer weights).")
        return tuple(sd[TEXT_PREFIX + key].shape)

    cfg.vocab_size, cfg.hidden_size = shape("embeddings.word_embeddings.weight")
    cfg.max_position_embeddings = shape("embeddings.position_embeddings.weight")[0]
    cfg.type_vocab_size = shape("embeddings.token_type_embeddings.weight")[0]
    cfg.intermediate_size = shape("encoder.layer.0.intermediate.dense.weight")[0]
    cfg.num_hidden_layers = len({int(k.split(".")[4]) for k in sd if k.startswith(TEXT_PREFIX + "encoder.layer.")})
    window = cfg.attention_window
    if isinstance(window, (list, tuple)) and len(window) != cfg.num_hidden_layers:
        raise CheckpointError(
            f"The text encoder config in {folder} gives {len(window)} attention windows "
            f"for the checkpoint's {cfg.num_hidden_layers} Longformer layers."
        )
    if cfg.hidden_size % cfg.num_attention_heads:
        raise CheckpointError(
            f"The text encoder config in {folder} has {cfg.num_attention_heads} heads, "
            f"which does not divide the checkpoint's width {cfg.hidden_size}."
        )
    return cfg


def _load_tokenizer(folder: Path):
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"The Merlin text encoder folder {folder} has no tokenizer (tokenizer.json or vocab.json + merges.txt), "
            "so prompts cannot be tokenised."
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:
        raise CheckpointError(f"The tokenizer in {folder} could not be loaded ({_first_line(err)}).") from None


class MerlinModel(ScreeningModel):
    """Merlin with encode-once screening and exact per-position logit maps.

    Native image layout (``encode_image``, ``image_features``): (B, 1, H, W, D) in RAS with D
    the slices, values HU windowed to [0, 1], exactly what Merlin's MONAI transforms give;
    the engine grid of the ``merlin`` profile (axcodes RAS) is already that layout.
    """

    family = "merlin"
    default_findings = "abdominal"
    profile: PreprocessProfile = MERLIN_PROFILE
    # merlin-vlm has no zero-shot wording; these read like the report sentences it was
    # trained on (lower-cased, tokenised the same way), mirrored positive/negative.
    prompt_templates = {
        "positive": ["There is {finding}.", "{finding} is present."],
        "negative": ["There is no {finding}.", "{finding} is not present."],
    }

    def __init__(self, config: I3ResNetConfig, text_encoder: nn.Module, tokenizer=None) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = I3ResNet(config)
        self.text_encoder = text_encoder
        self.text_projection = nn.Linear(text_encoder.config.hidden_size, config.dim_latent)
        self.tokenizer = tokenizer
        depth, height, width = I3ResNet.stride
        self.patch_size = (height, width, depth)  # token extent in grid voxels along x, y, z

    # ------------------------------------------------------------ loading
    @classmethod
    def from_state_dict(
        cls, sd: dict[str, torch.Tensor], text_encoder: str | Path | None, device: str = "cpu", source: str = "checkpoint"
    ) -> MerlinModel:
        from transformers import LongformerModel

        if text_encoder is None:
            raise CheckpointError(
                "Merlin needs its text encoder folder (the Clinical-Longformer config and tokenizer), but none was given."
            )
        folder = Path(text_encoder)
        if not folder.is_dir():
            raise CheckpointError(f"The Merlin text encoder folder {folder} does not exist.")
        if not any(k.startswith(IMAGE_PREFIX) for k in sd):
            raise CheckpointError(f"The Merlin {source} has no '{IMAGE_PREFIX}*' tensors, so it is not a Merlin model.")
        config = I3ResNetConfig.from_state_dict(sd, IMAGE_PREFIX)
        text_cfg = longformer_config_for(folder, sd)
        tokenizer = _load_tokenizer(folder)
        if len(tokenizer) > text_cfg.vocab_size:
            raise CheckpointError(f"The tokenizer in {folder} has {len(tokenizer)} tokens but the text encoder only {text_cfg.vocab_size}.")
        with torch.device("meta"):  # no memory or random init: every tensor comes from sd
            model = cls(config, LongformerModel(text_cfg, add_pooling_layer=TEXT_PREFIX + "pooler.dense.weight" in sd), tokenizer)
        expected = {to_published(k): tuple(v.shape) for k, v in model.state_dict().items()}
        check_state_keys(expected, shapes(sd), f"The Merlin {source}", ignorable=droppable_keys(text_cfg))
        clean = {from_published(k): (sd[k].float() if sd[k].is_floating_point() else sd[k]) for k in expected}
        model.load_state_dict(clean, strict=True, assign=True)
        _rebuild_buffers(model.text_encoder)
        return model.to(device).eval()

    # ------------------------------------------------------------ text
    @property
    def logit_scale(self) -> float:
        return LOGIT_SCALE

    @property
    def text_max_length(self) -> int:
        # Longformer/RoBERTa positions start after the padding index: two are never usable
        return min(MAX_TEXT_LENGTH, self.text_encoder.config.max_position_embeddings - 2)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Merlin's tokenisation: ``sanitize_report`` then the Longformer tokenizer, padded
        to the longest prompt, truncated at 1024 tokens."""
        if self.tokenizer is None:
            raise CheckpointError("This Merlin model has no tokenizer, so prompts cannot be tokenised.")
        enc = self.tokenizer(
            [sanitize_report(t) for t in texts],
            return_tensors="pt", padding=True, truncation=True, max_length=self.text_max_length,
        )
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def text_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, 512) unnormalised: the projected first-token state."""
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.text_projection(hidden[:, 0, :])

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_embedding(input_ids, attention_mask), dim=-1)

    def text_latents(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """Prompts -> (N, 512) L2-normalised text latents."""
        texts = list(texts)
        parts = [self.encode_text(**self.tokenize(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, self.config.dim_latent, device=self.device)

    # ------------------------------------------------------------ image
    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Native (B, 1, H, W, D) -> last feature map on the grid axes, (B, X', Y', Z', 2048)."""
        if x.ndim != 5 or x.shape[1] != 1:
            raise InputError(f"Merlin expects a (B, 1, H, W, D) image tensor, got shape {list(x.shape)}.")
        features = self.image_encoder.features(x.permute(0, 1, 4, 2, 3))  # Merlin's own permute to (B, 1, D, H, W)
        return features.permute(0, 3, 4, 2, 1)

    def _head(self, head: nn.Conv3d) -> tuple[torch.Tensor, torch.Tensor]:
        return head.weight.flatten(1), head.bias

    def image_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 512) unnormalised contrastive image embedding (Merlin's ``x_contrastive``)."""
        weight, bias = self._head(self.image_encoder.contrastive_head)
        return F.linear(self.feature_map(x).mean(dim=(1, 2, 3)), weight, bias)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_embedding(x), dim=-1)

    def phenotype_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1692) sigmoid of the phenotype head (Merlin's ``PhenotypeCls`` output)."""
        weight, bias = self._head(self.image_encoder.classifier)
        return torch.sigmoid(F.linear(self.feature_map(x).mean(dim=(1, 2, 3)), weight, bias))

    def token_contributions(self, features: torch.Tensor) -> torch.Tensor:
        """(B, X', Y', Z', 2048) features -> (B, X', Y', Z', 512) shares c(v) = (W f(v) + b) / N.

        They sum over the grid to the unnormalised image embedding (linear head on a mean).
        """
        weight, bias = self._head(self.image_encoder.contrastive_head)
        n = features.shape[1] * features.shape[2] * features.shape[3]
        return F.linear(features, weight, bias) / n

    def image_features(self, x: torch.Tensor) -> ImageFeatures:
        """Encode once: ``global_latent`` (B, 512) unnormalised, ``tokens`` (B, X', Y', Z', 512) summing to it."""
        tokens = self.token_contributions(self.feature_map(x))
        return ImageFeatures(global_latent=tokens.sum(dim=(1, 2, 3)), tokens=tokens)

    def token_layout(self) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
        """Position (a, b, c) is centred on grid voxel (32a, 32b, 16c): every strided kernel
        is centred (padding k // 2), so each stride-s stage puts output i over input s*i."""
        return self.patch_size, (0.0, 0.0, 0.0)

    # ------------------------------------------------------------ scores
    def logits(self, feats: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
        """(B, N) = LOGIT_SCALE * cos(image embedding, text embedding)."""
        return scaled_cosine_logits(feats, text, self.logit_scale)

    def token_logits(self, feats: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
        """(B, N, X', Y', Z') per-position shares of ``logits`` (bias share included): they sum to it."""
        return token_shares(feats, text, self.logit_scale)


def droppable_keys(text_cfg) -> dict[str, tuple[int, ...]]:
    """Tensors accepted (shape-checked) but not kept: see the module docstring."""
    return {"logit_scale": (), TEXT_PREFIX + "embeddings.position_ids": (1, text_cfg.max_position_embeddings)}


def _rebuild_buffers(module: nn.Module) -> None:
    """Non-persistent buffers (Longformer's ``position_ids``) were created on the meta device
    and are not in any state dict: recompute them on the CPU."""
    for sub in module.modules():
        for name, buf in list(sub.named_buffers(recurse=False)):
            if buf.is_meta and name == "position_ids":
                sub.register_buffer(name, torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
            elif buf.is_meta:
                raise CheckpointError(f"The Merlin text encoder has an uninitialised buffer '{name}'.")


def checkpoint_layout(config: I3ResNetConfig, text_cfg) -> dict[str, tuple[int, ...]]:
    """Published key -> shape of every tensor the model keeps, built on the meta device."""
    from transformers import LongformerModel

    with torch.device("meta"):
        model = MerlinModel(config, LongformerModel(text_cfg))
    return {to_published(k): tuple(v.shape) for k, v in model.state_dict().items()}


def load_merlin(weights: Path, text_encoder: str | Path | None, device: str = "cpu") -> MerlinModel:
    """Registry loader: the published Merlin ``.pt`` (or a safetensors copy) + a Clinical-Longformer folder."""
    weights = Path(weights)
    return MerlinModel.from_state_dict(read_merlin_weights(weights), text_encoder, device, source=f"checkpoint {weights.name}")


__all__ = ["MerlinModel", "checkpoint_layout", "load_merlin", "read_merlin_weights", "sanitize_report"]
