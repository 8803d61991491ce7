"""The project's own model (family ``medalign``): BrgSA's knowledge-bridged design, small
enough to train on a CPU, with a local-alignment head so every finding gets a map.

Image side: a two-step convolutional stem (stride 4) feeds a 3D ViT (tokens at stride 8);
a light decoder lifts the ViT tokens back to stride 4 and fuses the stem's features, so
local tokens see both context and fine detail.  The class token and the local tokens are
projected into one joint space.  Text side: a frozen sentence encoder (all-MiniLM-L6-v2)
and a trained projection; negation ("no effusion") is close to its affirmative in
MiniLM's space, so the projection is an MLP that can pull them apart.  A knowledge bank
re-expresses latents in shared entries (CMKI), as in BrgSA.

Image-text logit for a prompt t:
    scale * ( (cos(v, t) + cos(bank(v), t)) / 2  +  LSE_beta_i cos(p_i, t) ) / 2
with v the global latent and p_i the local tokens; the smooth maximum over tokens is
what makes the local map carry the evidence for the image-level decision.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medalign.core.errors import CheckpointError
from medalign.models.bank import KnowledgeBank
from medalign.models.base import ImageFeatures, ScreeningModel
from medalign.models.calibration import Calibration
from medalign.models.checkpoint_keys import check_state_keys, shapes
from medalign.models.profiles import DEMO, PreprocessProfile
from medalign.models.vit3d import ViT3D, ViT3DConfig

FORMAT = "medalign-v1"

# Inference wording.  Training uses a disjoint set (medalign.training.sentences.TRAIN_TEMPLATES), so
# evaluation measures zero-shot transfer to wordings the model never saw.
PROMPT_TEMPLATES = {
    "positive": ["There is {finding}.", "{finding} is seen on this CT.", "Findings consistent with {finding}."],
    "negative": ["There is no {finding}.", "No {finding} is seen on this CT.", "No evidence of {finding}."],
}


@dataclass
class MedAlignConfig:
    vit: ViT3DConfig = field(
        default_factory=lambda: ViT3DConfig(
            width=128, depth=2, heads=4, mlp_dim=256, patch_size=(1, 1, 1), base_size=(12, 12, 8), in_channels=64
        )
    )
    # stride-2 convolution blocks before the ViT; the local head fuses the second one (stride 4)
    stem_channels: tuple[int, ...] = (16, 32, 64)
    embed_dim: int = 128
    bank_size: int = 256
    text_dim: int = 384
    text_encoder: str = "all-MiniLM-L6-v2"
    # near-max pooling: one 16 mm token of lesion must be able to carry the image-level score
    lse_beta: float = 50.0
    # a depthwise 3x3x3 convolution in the local head (demo versions 1-2): 30% of a CPU
    # training step for little gain, so new models leave it out
    local_depthwise: bool = False
    # residual 3x3x3 convolution blocks on the stride-4 stem features before they join the
    # ViT tokens: a deeper path for the shape of small lesions (nodules, plaques, nodes) that
    # two stem convolutions cannot tell from normal anatomy; 0 = demo versions 1-5
    local_blocks: int = 0
    logit_scale: float = 10.0  # initial value; learned
    profile: PreprocessProfile = DEMO
    prompt_templates: dict = field(default_factory=lambda: {k: list(v) for k, v in PROMPT_TEMPLATES.items()})

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> MedAlignConfig:
        d = json.loads(text)
        d["vit"] = ViT3DConfig.from_dict(d["vit"])
        d["profile"] = PreprocessProfile.from_dict(d["profile"])
        d["stem_channels"] = tuple(d["stem_channels"])
        d.setdefault("local_depthwise", True)  # written before the option existed
        d.setdefault("local_blocks", 0)
        return cls(**d)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    # kernel 4 / stride 2 / padding 1 centres output o on input 2o + 0.5, so after two
    # blocks local token a sits at 4a + 1.5 = a * 4 + (4 - 1) / 2, the layout every map assumes
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel_size=4, stride=2, padding=1), nn.GroupNorm(min(8, cout), cout), nn.GELU()
    )


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(channels, channels, kernel_size=3, padding=1), nn.GroupNorm(min(8, channels), channels), nn.GELU(),
            nn.Conv3d(channels, channels, kernel_size=3, padding=1), nn.GroupNorm(min(8, channels), channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.body(x))


class MedAlignModel(ScreeningModel):
    family = "medalign"

    def __init__(self, cfg: MedAlignConfig, text_encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.profile = cfg.profile
        self.prompt_templates = cfg.prompt_templates
        chans = (cfg.profile.n_channels, *cfg.stem_channels)
        self.stem = nn.ModuleList(_conv_block(a, b) for a, b in zip(chans[:-1], chans[1:]))
        c2 = cfg.stem_channels[1]
        self.local_path = nn.Sequential(*(_ResidualBlock(c2) for _ in range(cfg.local_blocks)))
        self.vit = ViT3D(cfg.vit)
        w, e = cfg.vit.width, cfg.embed_dim
        self.global_embedder = nn.Linear(w, e)
        depthwise = [nn.Conv3d(e, e, kernel_size=3, padding=1, groups=e), nn.GELU()] if cfg.local_depthwise else []
        self.local_fuse = nn.Sequential(
            nn.Conv3d(w + c2, e, kernel_size=1), nn.GELU(), *depthwise, nn.Conv3d(e, e, kernel_size=1)
        )
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, 2 * e), nn.GELU(), nn.Linear(2 * e, e))
        self.bank = KnowledgeBank(cfg.bank_size, e)
        self.log_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale)))
        self.patch_size = (4, 4, 4)  # local tokens sit at stride 4 of the model grid
        self.text_encoder = text_encoder  # frozen; never saved in our checkpoints

    # ---------------------------------------------------------------- image
    def image_features(self, x: torch.Tensor) -> ImageFeatures:
        levels = []
        for block in self.stem:
            x = block(x)
            levels.append(x)
        s2 = self.local_path(levels[1])  # stride 4: where the local tokens live
        cls, patches, grid = self.vit(levels[-1])
        b = patches.shape[0]
        coarse = patches.transpose(1, 2).reshape(b, -1, *grid)
        up = F.interpolate(coarse, size=s2.shape[2:], mode="trilinear", align_corners=False)
        local = self.local_fuse(torch.cat([up, s2], dim=1))  # (B, E, X', Y', Z')
        return ImageFeatures(global_latent=self.global_embedder(cls), tokens=local.permute(0, 2, 3, 4, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(global latent, local tokens): plain tensors so DistributedDataParallel can wrap it."""
        feats = self.image_features(x)
        return feats.global_latent, feats.tokens

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_features(x).global_latent, dim=-1)

    # ---------------------------------------------------------------- text
    def _require_text_encoder(self) -> nn.Module:
        if self.text_encoder is None:
            raise CheckpointError("This model has no text encoder loaded; load it with medalign.models.load().")
        return self.text_encoder

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self._require_text_encoder().tokenize(texts)

    def project_text(self, sentence_embeddings: torch.Tensor) -> torch.Tensor:
        """Frozen sentence embeddings (N, text_dim) -> normalised joint-space latents (N, E)."""
        return F.normalize(self.text_proj(sentence_embeddings), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raw = self._require_text_encoder()(input_ids, attention_mask)
        return self.project_text(raw.to(self.log_scale.device))

    def text_latents(self, texts: list[str]) -> torch.Tensor:
        raw = self._require_text_encoder().embed(list(texts))
        return self.project_text(raw.to(self.log_scale.device))

    # ---------------------------------------------------------------- scores
    def global_similarity(self, feats: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
        v = F.normalize(feats.global_latent, dim=-1)
        v_hat = F.normalize(self.bank(feats.global_latent), dim=-1)
        return (v @ text.T + v_hat @ text.T) / 2

    def local_similarity(self, feats: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
        """(B, N, X', Y', Z') cosine of every local token with every prompt."""
        p = F.normalize(feats.tokens, dim=-1)
        return torch.einsum("bxyze,ne->bnxyz", p, text)

    def logits(self, feats: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
        beta = self.cfg.lse_beta
        local = self.local_similarity(feats, text).flatten(2)
        pooled = (torch.logsumexp(beta * local, dim=-1) - math.log(local.shape[-1])) / beta
        return self.log_scale.exp() * (self.global_similarity(feats, text) + pooled) / 2

    def token_logits(self, feats: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * self.local_similarity(feats, text)

    # ---------------------------------------------------------------- weights
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("text_encoder.")}


def save_checkpoint(model: MedAlignModel, path: str | Path, extra: dict | None = None) -> Path:
    """Write weights + config into one safetensors file (atomic)."""
    from safetensors.torch import save_file

    from medalign.core.atomic import atomic_output

    path = Path(path)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.trainable_state_dict().items()}
    meta = {"format": FORMAT, "family": "medalign", "config": model.cfg.to_json()}
    if extra:
        meta["extra"] = json.dumps(extra)
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        os.chmod(tmp, 0o644)  # a shareable model file, not a private temp file
    return path


def read_checkpoint(path: str | Path, tensors: bool = True) -> tuple[MedAlignConfig, dict[str, torch.Tensor], dict]:
    """(config, weights, training provenance); ``tensors=False`` reads only the header, for
    callers that need the configuration of a possibly large file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: {path}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict) if tensors else {}
    except Exception as exc:  # safetensors raises several types for corrupt/truncated files
        raise CheckpointError(f"{path.name} is not a readable safetensors checkpoint (corrupt or truncated): {exc}.") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path.name} is not a MedAlign checkpoint (metadata format {meta.get('format')!r}).")
    extra = json.loads(meta["extra"]) if "extra" in meta else {}
    return MedAlignConfig.from_json(meta["config"]), weights, extra


def load_state_strict(model: nn.Module, tensors: dict[str, torch.Tensor], name: str) -> None:
    """Load weights; any missing/unexpected/mis-shaped key is one CheckpointError sentence."""
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("text_encoder.")}
    check_state_keys(shapes(own), shapes(tensors), name)
    model.load_state_dict(tensors, strict=False)


def build_text_encoder(spec: str | Path | None, cfg: MedAlignConfig) -> nn.Module:
    from medalign.models.text_encoders import SentenceEncoder, load_minilm

    if spec is None or str(spec) == cfg.text_encoder:
        return load_minilm()
    return SentenceEncoder(spec)


def load_checkpoint(weights: Path, text_encoder: str | Path | None = None, device: str = "cpu") -> MedAlignModel:
    cfg, tensors, extra = read_checkpoint(weights)
    model = MedAlignModel(cfg, text_encoder=None)
    load_state_strict(model, tensors, Path(weights).name)
    # per-finding thresholds and AUCs chosen on held-out data at training time (ROC point nearest (0, 1))
    model.calibration = Calibration.from_checkpoint_extra(extra)
    model.training_info = extra
    model.text_encoder = build_text_encoder(text_encoder, cfg)
    return model.to(device).eval()
