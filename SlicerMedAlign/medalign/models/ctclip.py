"""CT-CLIP (Hamamci et al. 2024) as a ``ScreeningModel`` that loads ``CT-CLIP_v2.pt`` as is.

CT-CLIP = CTViT image encoder (``ctvit.py``) + a BERT text encoder (CXR-BERT) + two bias-free
linear projections into a 512-d joint space + a learned temperature.  The image latent is
``to_visual_latent(mean over slice slabs of the quantised CTViT tokens)``, the text latent
``to_text_latent(BERT CLS)``; a logit is ``exp(temperature) * cos(image, text)``.

Why this rewrite rather than the reference code: the reference re-encodes the volume for
every finding (18 image encodings for CT-RATE) and has no local maps.  Here the image is
encoded once and, because ``to_visual_latent`` is linear without bias, the latent splits
*exactly* into per-token contributions: with the weight viewed as ``W[l, h, w, d]`` and
quantised tokens ``f[t, h, w, d]`` over ``T`` slabs,

    latent[l] = sum_{t,h,w} c[t,h,w,l],   c[t,h,w,l] = sum_d W[l,h,w,d] f[t,h,w,d] / T,

so the token logits ``scale * c . text / |latent|`` add up to the finding's logit.

Checkpoint keys kept out of the model on purpose (accepted and shape-checked, never
used at inference): ``to_text_latent_extra``/``to_visual_latent_extra`` (CLOOB copies,
unused with ``extra_latent_projection=False``; 151 M parameters), the stale
``text_transformer.embeddings.position_ids`` buffer of old transformers versions, and
the CTViT parts listed in ``CTViTConfig.droppable_keys``.  Every other key loads strictly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medalign.core.errors import CheckpointError, InputError
from medalign.models.base import ImageFeatures, ScreeningModel
from medalign.models.checkpoint_keys import check_state_keys, shapes
from medalign.models.ctvit import CTViT, CTViTConfig
from medalign.models.pooled_scores import scaled_cosine_logits, token_shares
from medalign.models.profiles import CTCLIP as CTCLIP_PROFILE
from medalign.models.profiles import PreprocessProfile

TEXT_PREFIX = "text_transformer."
VISUAL_PREFIX = "visual_transformer."
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")
MAX_TEXT_LENGTH = 512  # CT-CLIP's tokenizer call: truncation=True, max_length=512


@dataclass(frozen=True)
class CTCLIPConfig:
    """Sizes of a CT-CLIP model, all read from checkpoint shapes (``from_state_dict``)."""

    vision: CTViTConfig
    token_hw: tuple[int, int]  # tokens per slab along h and w that to_visual_latent expects
    dim_latent: int
    dim_text: int

    @property
    def image_hw(self) -> tuple[int, int]:
        """Slice size in voxels (480 x 480 for the published model)."""
        p1, p2 = self.vision.patch_size
        return self.token_hw[0] * p1, self.token_hw[1] * p2

    @property
    def dim_image(self) -> int:
        return self.token_hw[0] * self.token_hw[1] * self.vision.dim

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], image_hw: tuple[int, int] | None = None) -> CTCLIPConfig:
        """Sizes from tensor shapes. The token grid per slab cannot be read from them when it
        is not square (to_visual_latent only sees h*w*dim inputs): ``image_hw``, the slice
        size in voxels from a config beside the weights (``read_image_size``), settles it."""
        vision = CTViTConfig.from_state_dict(sd, VISUAL_PREFIX)
        for key in ("to_visual_latent.weight", "to_text_latent.weight", "temperature"):
            if key not in sd:
                raise CheckpointError(f"The CT-CLIP checkpoint has no '{key}' tensor, so it is not a CT-CLIP model.")
        dim_latent, dim_image = sd["to_visual_latent.weight"].shape
        token_hw = _token_grid(dim_image, vision, image_hw)
        return cls(vision=vision, token_hw=token_hw, dim_latent=dim_latent, dim_text=sd["to_text_latent.weight"].shape[1])

    def droppable_keys(self, sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        """Tensors accepted but not kept, with their required shapes (see module docstring)."""
        out = self.vision.droppable_keys(VISUAL_PREFIX)
        out["to_text_latent_extra.weight"] = (self.dim_latent, self.dim_text)
        out["to_visual_latent_extra.weight"] = (self.dim_latent, self.dim_image)
        pos = sd.get(TEXT_PREFIX + "embeddings.position_embeddings.weight")
        if pos is not None:
            out[TEXT_PREFIX + "embeddings.position_ids"] = (1, pos.shape[0])
        return out


IMAGE_SIZE_HELP = 'put a config.json beside the weights with "image_size": [height, width] in voxels'


def _token_grid(dim_image: int, vision: CTViTConfig, image_hw: tuple[int, int] | None) -> tuple[int, int]:
    """Tokens per slab along h and w: from ``image_hw`` when given, else the square grid."""
    if image_hw is not None:
        p1, p2 = vision.patch_size
        h, w = image_hw
        if h % p1 or w % p2 or (h // p1) * (w // p2) * vision.dim != dim_image:
            raise CheckpointError(
                f"The configured image size {h} x {w} does not fit this CT-CLIP checkpoint: with {p1} x {p2} patches "
                f"of {vision.dim}-d tokens its to_visual_latent needs {dim_image} inputs."
            )
        return h // p1, w // p2
    side = math.isqrt(dim_image // vision.dim) if dim_image % vision.dim == 0 else 0
    if side == 0 or side * side * vision.dim != dim_image:
        raise CheckpointError(
            f"The CT-CLIP checkpoint's to_visual_latent takes {dim_image} inputs, which is not a square token grid "
            f"of {vision.dim}-d tokens; {IMAGE_SIZE_HELP}."
        )
    return side, side


def read_image_size(weights: Path) -> tuple[int, int] | None:
    """``image_size`` (an int or [height, width]) from ``<weights>.json`` or ``config.json``
    beside the weights (CT-CLIP's CTViT takes ``image_size`` as an argument, not a tensor)."""
    for candidate in (weights.with_suffix(".json"), weights.parent / "config.json"):
        if not candidate.is_file():
            continue
        try:
            value = json.loads(candidate.read_text(encoding="utf-8")).get("image_size")
        except (OSError, ValueError, AttributeError) as err:
            raise CheckpointError(f"The CT-CLIP config {candidate} is not readable JSON ({_first_line(err)}).") from None
        if value is None:
            continue
        size = (value, value) if isinstance(value, int) else tuple(value)
        if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
            raise CheckpointError(f"\"image_size\" in {candidate} must be a positive integer or [height, width]; {IMAGE_SIZE_HELP}.")
        return size  # type: ignore[return-value]
    return None


# ---------------------------------------------------------------------------- files


def _first_line(err: BaseException) -> str:
    """The first sentence of an exception's text, to quote inside our own one-sentence message."""
    lines = str(err).strip().splitlines()
    text = re.split(r"(?<=[.!?])\s+(?=[A-Z])", lines[0])[0] if lines else type(err).__name__
    return text.rstrip(".")


def read_state_dict(path: str | Path, family: str = "CT-CLIP", convert_hint: str = "") -> dict[str, torch.Tensor]:
    """A plain tensor state dict from a safetensors file or a torch zip (never full unpickling).

    ``family`` only names the model in error sentences (COLIPRI and Merlin reuse this
    reader); ``convert_hint``, a command that turns a trusted pickle into safetensors, is
    offered when a file holds more than tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{family} weights file {path} does not exist.")
    with path.open("rb") as fh:
        head = fh.read(9)
    try:
        if len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header length, then JSON
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):  # legacy (non-zip) files cannot be memory-mapped
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{family} weights file {path.name} holds more than plain tensors and is refused for safety ({_first_line(err)})"
            + (f"; if you trust it, convert it once with: {convert_hint}." if convert_hint else ".")
        ) from None
    except Exception as err:  # truncated zip, bad header, I/O error ...
        raise CheckpointError(
            f"{family} weights file {path.name} could not be read, it may be truncated or corrupt ({_first_line(err)})."
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise CheckpointError(f"{family} weights file {path.name} is not a state dict of named tensors.")
    return sd


def match_state_dict(
    expected: dict[str, tuple[int, ...]],
    sd: dict[str, torch.Tensor],
    droppable: dict[str, tuple[int, ...]],
    source: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """The tensors for ``expected``; any missing, unexpected or mis-shaped key is one CheckpointError."""
    check_state_keys(expected, shapes(sd), f"The CT-CLIP {source}", ignorable=droppable)
    return {k: sd[k] for k in expected}


def bert_config_for(
    folder: str | Path,
    sd: dict[str, torch.Tensor],
    has_text: bool = True,
    prefix: str = TEXT_PREFIX,
    family: str = "CT-CLIP",
):
    """BertConfig from the folder's config.json, with every size the checkpoint fixes taken from it.

    Only the head count (and activation, eps) cannot be read from tensor shapes.  ``prefix``
    is where the BERT tensors sit in the checkpoint; ``family`` names the model in errors.
    """
    from transformers import BertConfig

    folder = Path(folder)
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"The {family} text encoder folder {folder} has no readable config.json ({_first_line(err)}).") from None
    # CXR-BERT declares model_type "cxr-bert"; its encoder is a plain BERT.
    raw = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "auto_map")}
    cfg = BertConfig.from_dict(raw)
    if has_text:
        def shape(key: str) -> tuple[int, ...]:
            if prefix + key not in sd:
                raise CheckpointError(f"The {family} checkpoint has text encoder weights but no '{prefix + key}'.")
            return tuple(sd[prefix + key].shape)

        cfg.vocab_size, cfg.hidden_size = shape("embeddings.word_embeddings.weight")
        cfg.max_position_embeddings = shape("embeddings.position_embeddings.weight")[0]
        cfg.type_vocab_size = shape("embeddings.token_type_embeddings.weight")[0]
        cfg.intermediate_size = shape("encoder.layer.0.intermediate.dense.weight")[0]
        layer_prefix = prefix + "encoder.layer."
        layers = {int(k[len(layer_prefix):].split(".")[0]) for k in sd if k.startswith(layer_prefix)}
        cfg.num_hidden_layers = len(layers)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise CheckpointError(
                f"The text encoder config in {folder} has {cfg.num_attention_heads} heads, "
                f"which does not divide the checkpoint's width {cfg.hidden_size}."
            )
    cfg._attn_implementation = "eager"  # what the parity fixtures were made with
    return cfg


def _load_tokenizer(folder: Path):
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import BertTokenizer

    try:
        return BertTokenizer.from_pretrained(str(folder), do_lower_case=True)
    except Exception as err:
        raise CheckpointError(f"The tokenizer in {folder} could not be loaded ({_first_line(err)}).") from None


# ---------------------------------------------------------------------------- model


class CTCLIPModel(ScreeningModel):
    """CT-CLIP with encode-once screening and exact per-token logit maps.

    Native image layout (``encode_image``, ``image_features``): (B, 1, D, H, W) with D the
    slices (z), H the nibabel i axis (x) and W the j axis (y), values HU/1000 in [-1, 1];
    ``input_from_grid`` produces it from the engine's (B, 1, X, Y, Z) grid.
    """

    family = "ct-clip"
    profile: PreprocessProfile = CTCLIP_PROFILE
    prompt_templates = {"positive": ["{finding} is present."], "negative": ["{finding} is not present."]}
    # CT-CLIP's published zero-shot protocol is exactly this one prompt pair; knowledge-base
    # ensembling has not been validated on it, so by default its numbers stay comparable.
    use_knowledge_prompts = False

    def __init__(self, config: CTCLIPConfig, text_encoder: nn.Module, tokenizer=None) -> None:
        super().__init__()
        self.config = config
        self.temperature = nn.Parameter(torch.tensor(1.0))  # stored as a 0-d value, scale = exp()
        self.text_transformer = text_encoder
        self.visual_transformer = CTViT(config.vision)
        self.to_text_latent = nn.Linear(config.dim_text, config.dim_latent, bias=False)
        self.to_visual_latent = nn.Linear(config.dim_image, config.dim_latent, bias=False)
        self.tokenizer = tokenizer
        p1, p2 = config.vision.patch_size
        pt = config.vision.temporal_patch_size
        self.patch_size = (p1, p2, pt)  # token extent in grid voxels along x, y, z
        hh, ww = config.image_hw
        if (hh, ww) != CTCLIP_PROFILE.size[:2]:  # a smaller CTViT: same spacing, its own slice size
            z = max(pt, CTCLIP_PROFILE.size[2] // pt * pt)
            self.profile = dataclasses.replace(CTCLIP_PROFILE, size=(hh, ww, z))

    # ------------------------------------------------------------ loading
    @classmethod
    def from_state_dict(
        cls,
        sd: dict[str, torch.Tensor],
        text_encoder: str | Path | None,
        device: str | torch.device = "cpu",
        source: str = "checkpoint",
        image_hw: tuple[int, int] | None = None,
    ) -> CTCLIPModel:
        """Build the model whose sizes the state dict implies and load it strictly (see module docstring).

        ``text_encoder`` is a folder with a BERT ``config.json`` (and normally the
        tokenizer); its weights are used only when the checkpoint has no
        ``text_transformer.*`` tensors.
        """
        from transformers import BertModel

        if text_encoder is None:
            raise CheckpointError(
                "CT-CLIP needs its text encoder folder (the CXR-BERT config and tokenizer), but none was given."
            )
        folder = Path(text_encoder)
        if not folder.is_dir():
            raise CheckpointError(f"The CT-CLIP text encoder folder {folder} does not exist.")
        config = CTCLIPConfig.from_state_dict(sd, image_hw)
        has_text = any(k.startswith(TEXT_PREFIX) for k in sd)
        bert_cfg = bert_config_for(folder, sd, has_text)
        if has_text:
            bert = BertModel(bert_cfg, add_pooling_layer=TEXT_PREFIX + "pooler.dense.weight" in sd)
        else:
            try:
                bert = BertModel.from_pretrained(str(folder), config=bert_cfg)
            except Exception as err:
                raise CheckpointError(f"The text encoder weights in {folder} could not be loaded ({_first_line(err)}).") from None
        if bert.config.hidden_size != config.dim_text:
            raise CheckpointError(
                f"The text encoder in {folder} is {bert.config.hidden_size} wide "
                f"but the CT-CLIP checkpoint projects {config.dim_text}-d text."
            )
        tokenizer = _load_tokenizer(folder)
        if tokenizer is not None and len(tokenizer) > bert.config.vocab_size:
            raise CheckpointError(
                f"The tokenizer in {folder} has {len(tokenizer)} tokens but the text encoder only {bert.config.vocab_size}."
            )
        with torch.device("meta"):  # no memory or random init for the 150 M-parameter projection
            model = cls(config, bert, tokenizer)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if has_text or not k.startswith(TEXT_PREFIX)}
        clean = match_state_dict(expected, sd, config.droppable_keys(sd), source)
        clean = {k: (v.float() if v.is_floating_point() else v) for k, v in clean.items()}
        model.load_state_dict(clean, strict=has_text, assign=True)
        return model.to(device).eval()

    # ------------------------------------------------------------ text
    @property
    def logit_scale(self) -> torch.Tensor:
        return self.temperature.exp()

    @property
    def text_max_length(self) -> int:
        return min(MAX_TEXT_LENGTH, self.text_transformer.config.max_position_embeddings)

    def tokenize(self, texts: list[str], padding: str = "longest") -> dict[str, torch.Tensor]:
        """CT-CLIP's tokenisation (BERT, lower-case, truncated at 512 tokens).

        The reference pads every prompt to 512 tokens; padded positions are masked out, so
        ``padding="longest"`` gives the same latents far faster (``"max_length"`` replicates).
        """
        if self.tokenizer is None:
            raise CheckpointError(
                "The CT-CLIP text encoder folder has no tokenizer (vocab.txt or tokenizer.json), so prompts cannot be tokenised."
            )
        enc = self.tokenizer(
            list(texts), return_tensors="pt", padding=padding, truncation=True, max_length=self.text_max_length
        )
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def text_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named intermediates of the text path (the parity fixture's names)."""
        # token_type_ids deliberately not passed: CT-CLIP's forward does not, so BERT uses zeros.
        hidden = self.text_transformer(input_ids, attention_mask=attention_mask)[0]
        cls_embed = hidden[:, 0, :]
        latent = self.to_text_latent(cls_embed)
        return {
            "text_last_hidden_state": hidden,
            "text_embeds": cls_embed,
            "text_latent_unnormalized": latent,
            "text_latent": F.normalize(latent, dim=-1),
        }

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_outputs(input_ids, attention_mask)["text_latent"]

    def text_latents(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Prompts -> (N, D) L2-normalised text latents."""
        texts = list(texts)
        parts = [self.encode_text(**self.tokenize(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, self.config.dim_latent, device=self.device)

    # ------------------------------------------------------------ image
    def input_from_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Engine grid (B, 1, X, Y, Z) in LPS -> CT-CLIP's native (B, 1, Z, X, Y).

        CT-CLIP's loader (``data_inference_nii.py``) takes the nibabel array (i, j, k),
        resamples and crops it as (i, j, k) and finally permutes it to (k, i, j): slices
        first, no flips.  The engine grid is that nibabel order, so this is a permutation.
        """
        if x.ndim != 5:
            raise InputError(f"CT-CLIP expects a (B, 1, X, Y, Z) grid tensor, got shape {list(x.shape)}.")
        return x.permute(0, 1, 4, 2, 3).contiguous()

    def image_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named intermediates of the image path for a native (B, 1, D, H, W) tensor."""
        self.visual_transformer.check_input(x, self.config.image_hw)
        pre_vq = self.visual_transformer.encode(x)
        codes, indices = self.visual_transformer.vq(pre_vq)
        embeds = codes.mean(dim=1).flatten(1)  # mean over slabs, flattened (h, w, d) as the reference
        latent = self.to_visual_latent(embeds)
        return {
            "pre_vq_tokens": pre_vq,
            "encoded_tokens": codes,
            "codebook_indices": indices,
            "image_embeds": embeds,
            "image_latent_unnormalized": latent,
            "image_latent": F.normalize(latent, dim=-1),
        }

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_outputs(x)["image_latent"]

    def token_contributions(self, codes: torch.Tensor) -> torch.Tensor:
        """Quantised tokens (B, t, h, w, d) -> exact latent contributions (B, h, w, t, latent).

        Axes follow the grid (x = h, y = w, z = t).  ``to_visual_latent`` has no bias, so
        the contributions sum to the unnormalised image latent.
        """
        _, t, h, w, d = codes.shape
        weight = self.to_visual_latent.weight.view(-1, h, w, d)  # a view: no copy of the 600 MB matrix
        return torch.einsum("lhwd,bthwd->bhwtl", weight, codes) / t

    def image_features(self, x: torch.Tensor) -> ImageFeatures:
        """Encode once: ``global_latent`` (B, 512) unnormalised, ``tokens`` (B, X', Y', Z', 512).

        ``tokens.sum((1, 2, 3)) == global_latent`` (up to float rounding; the bias is zero).
        """
        out = self.image_outputs(x)
        return ImageFeatures(
            global_latent=out["image_latent_unnormalized"], tokens=self.token_contributions(out["encoded_tokens"])
        )

    # ------------------------------------------------------------ scores
    def logits(self, feats: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
        """(B, N) = exp(temperature) * cos(image latent, text latent), CT-CLIP's zero-shot logit."""
        return scaled_cosine_logits(feats, text, self.logit_scale)

    def token_logits(self, feats: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
        """(B, N, X', Y', Z') per-token shares of ``logits``: they sum exactly to it (no bias share)."""
        return token_shares(feats, text, self.logit_scale)


def checkpoint_layout(config: CTCLIPConfig, bert_config, add_pooling_layer: bool = True) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor the model keeps for ``config``, built on the meta device (no memory).

    With ``config.droppable_keys`` this is the whole key set a checkpoint may hold; the
    parity tests compare it with the published checkpoint's 361-key layout.
    """
    from transformers import BertModel

    with torch.device("meta"):
        model = CTCLIPModel(config, BertModel(bert_config, add_pooling_layer=add_pooling_layer))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_ctclip(weights: Path, text_encoder: str | Path | None, device: str = "cpu") -> CTCLIPModel:
    """Registry loader: a ``CT-CLIP_v2.pt``-layout file (torch zip or safetensors) + CXR-BERT folder."""
    weights = Path(weights)
    return CTCLIPModel.from_state_dict(
        read_state_dict(weights), text_encoder, device, source=f"checkpoint {weights.name}", image_hw=read_image_size(weights)
    )


__all__ = ["CTCLIPConfig", "CTCLIPModel", "bert_config_for", "checkpoint_layout", "load_ctclip", "read_state_dict", "match_state_dict"]
