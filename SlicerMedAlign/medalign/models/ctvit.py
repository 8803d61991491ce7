"""CTViT, CT-CLIP's image encoder, rewritten so it loads the published checkpoint key for key.

CTViT (Hamamci et al. 2024, public code ``transformer_maskgit/ctvit.py`` at commit a2a155c6)
cuts a volume into (temporal x spatial) patches, runs a *spatial* transformer over every
slab of slices and then a *temporal* transformer along the slice axis, and snaps every
token to its nearest VQ codebook row.  CT-CLIP pools those quantised tokens into its
image latent, so the quantiser is part of the inference path and must be replicated
exactly (hard argmax over cosine similarity).

Only the encoding path exists here; the decoder heads, the first-frame patch branch and
the training state of the quantiser are not needed to screen and are dropped on load
(see ``CTViTConfig.droppable_keys``).  Module names mirror the checkpoint's keys, which
is why some submodules are registered under numeric names ("0", "1", "3").

Reference quirks replicated on purpose (each changes the numbers if "fixed"):

* attention keys/values are computed from the *un-normalised* input; only the query
  goes through the pre-attention LayerNorm;
* q and k are L2-normalised, scaled by learned per-dimension ``q_scale``/``k_scale`` and
  the logits multiplied by a constant 8 (not ``dim_head ** -0.5``);
* the temporal transformer's position generator (PEG) reinterprets memory laid out as
  (b, h, w, t) as (b, t, h, w) before its causal depthwise convolution.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medalign.core.errors import CheckpointError


@dataclass(frozen=True)
class CTViTConfig:
    """Every size of a CTViT encoder; the published CT-CLIP values are the defaults."""

    dim: int = 512
    codebook_size: int = 8192
    patch_size: tuple[int, int] = (20, 20)  # (p1 along h, p2 along w) in voxels
    temporal_patch_size: int = 10  # pt: slices per token along the slice axis
    spatial_depth: int = 4
    temporal_depth: int = 4
    heads: int = 8
    dim_head: int = 32
    ff_inner: int = 1365  # int(4 * 2/3 * dim): GEGLU width of the feed-forward blocks
    pos_bias_hidden_layers: int = 2  # Linear+LeakyReLU layers of ContinuousPositionBias
    channels: int = 1

    @property
    def patch_dim(self) -> int:
        """Voxels per token (c * pt * p1 * p2)."""
        return self.channels * self.temporal_patch_size * self.patch_size[0] * self.patch_size[1]

    @property
    def frame_patch_dim(self) -> int:
        return self.channels * self.patch_size[0] * self.patch_size[1]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "visual_transformer.") -> CTViTConfig:
        """Read the encoder's sizes from tensor shapes, so any CTViT configuration loads.

        Channels are taken as 1 (CT).  The spatial patch size comes from the first-frame
        branch (``p1 * p2`` inputs), which the published checkpoint carries even though
        inference never uses it; without it the CT-CLIP patch sizes (20, 10) are assumed
        when they fit.
        """

        def shape(key: str) -> tuple[int, ...] | None:
            t = sd.get(prefix + key)
            return None if t is None else tuple(t.shape)

        def need(key: str) -> tuple[int, ...]:
            s = shape(key)
            if s is None:
                raise CheckpointError(f"The CT-CLIP checkpoint has no '{prefix + key}' tensor, so it is not a CTViT image encoder.")
            return s

        dim, patch_dim = need("to_patch_emb.2.weight")
        codebook = need("vq._codebook.embed")
        if len(codebook) != 3 or codebook[0] != 1 or codebook[2] != dim:
            raise CheckpointError(
                f"The CT-CLIP checkpoint's '{prefix}vq._codebook.embed' has shape {list(codebook)}, expected [1, codebook size, {dim}]."
            )
        frame_dim = None
        for key, axis in (("to_patch_emb_first_frame.2.weight", 1), ("to_pixels_first_frame.0.weight", 0)):
            s = shape(key)
            if s is not None:
                frame_dim = s[axis]
                break
        if frame_dim is None:
            frame_dim = 400 if patch_dim == 4000 else None
        p = math.isqrt(frame_dim) if frame_dim else 0
        if not frame_dim or p * p != frame_dim or patch_dim % frame_dim:
            raise CheckpointError(
                "Cannot tell the CTViT patch size from the checkpoint "
                f"(patch embedding takes {patch_dim} voxels; first-frame branch {frame_dim})."
            )

        def depth(name: str) -> int:
            pat = re.compile(re.escape(f"{prefix}{name}.layers.") + r"(\d+)\.")
            idx = {int(m.group(1)) for k in sd if (m := pat.match(k))}
            if not idx or idx != set(range(len(idx))):
                raise CheckpointError(f"The CT-CLIP checkpoint's '{prefix}{name}' layers are missing or not numbered 0..N-1.")
            return len(idx)

        (dim_head,) = need("enc_spatial_transformer.layers.0.1.q_scale")
        inner = need("enc_spatial_transformer.layers.0.1.to_q.weight")[0]
        if inner % dim_head:
            raise CheckpointError(f"The CT-CLIP checkpoint's attention width {inner} is not a multiple of its head size {dim_head}.")
        ff_inner = need("enc_spatial_transformer.layers.0.3.4.weight")[1]
        mlp = re.compile(re.escape(prefix + "spatial_rel_pos_bias.net.") + r"(\d+)\.")
        n_net = len({int(m.group(1)) for k in sd if (m := mlp.match(k))})
        return cls(
            dim=dim,
            codebook_size=codebook[1],
            patch_size=(p, p),
            temporal_patch_size=patch_dim // frame_dim,
            spatial_depth=depth("enc_spatial_transformer"),
            temporal_depth=depth("enc_temporal_transformer"),
            heads=inner // dim_head,
            dim_head=dim_head,
            ff_inner=ff_inner,
            pos_bias_hidden_layers=max(n_net - 1, 1),
        )

    def droppable_keys(self, prefix: str = "visual_transformer.") -> dict[str, tuple[int, ...]]:
        """Checkpoint tensors that inference never reads, with the shape each must have.

        They are accepted (and shape-checked, so a checkpoint of another configuration
        still fails) but not kept: the first-frame patch branch and both pixel decoders
        (``to_patch_emb_first_frame``, ``to_pixels_first_frame``, ``to_pixels``), the
        zero-size ``null_kv`` and unused cross-attention ``context_norm`` of every
        attention block, and the quantiser's training state (``initted``, ``cluster_size``).
        """
        d, f, pd = self.dim, self.frame_patch_dim, self.patch_dim
        out: dict[str, tuple[int, ...]] = {
            "to_patch_emb_first_frame.1.weight": (f,),
            "to_patch_emb_first_frame.1.bias": (f,),
            "to_patch_emb_first_frame.2.weight": (d, f),
            "to_patch_emb_first_frame.2.bias": (d,),
            "to_patch_emb_first_frame.3.weight": (d,),
            "to_patch_emb_first_frame.3.bias": (d,),
            "to_pixels_first_frame.0.weight": (f, d),
            "to_pixels_first_frame.0.bias": (f,),
            "to_pixels.0.weight": (pd, d),
            "to_pixels.0.bias": (pd,),
            "vq._codebook.initted": (1,),
            "vq._codebook.cluster_size": (1, self.codebook_size),
        }
        for name, depth in (("enc_spatial_transformer", self.spatial_depth), ("enc_temporal_transformer", self.temporal_depth)):
            for i in range(depth):
                base = f"{name}.layers.{i}.1."
                out[base + "null_kv"] = (self.heads, 0, self.dim_head)  # zero null key/values: nothing to load
                out[base + "context_norm.gamma"] = (d,)
                out[base + "context_norm.beta"] = (d,)
        return {prefix + k: v for k, v in out.items()}


class GammaLayerNorm(nn.Module):
    """LayerNorm with a learned gain and a zero bias kept as a buffer (CTViT's own LayerNorm)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class PEG(nn.Module):
    """Position generator: causal depthwise 3x3x3 convolution over the (t, h, w) token grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dsconv = nn.Conv3d(dim, dim, 3, groups=dim)

    def forward(self, x: torch.Tensor, video_shape: tuple[int, int, int, int]) -> torch.Tensor:
        # Plain reshape on purpose: for the temporal stage x is laid out (b h w) t d and the
        # reference reinterprets that memory as (b, t, h, w) (see module docstring).
        grid = x.reshape(*video_shape, x.shape[-1]).permute(0, 4, 1, 2, 3)
        grid = F.pad(grid, (1, 1, 1, 1, 2, 0))  # w, h symmetric; t causal (two frames before)
        grid = self.dsconv(grid)
        return grid.permute(0, 2, 3, 4, 1).reshape(x.shape)


class Attention(nn.Module):
    """CTViT self-attention (cosine-sim with learned q/k scales; see module docstring)."""

    scale = 8.0
    max_score_bytes = 64 * 2**20

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm = GammaLayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.q_scale = nn.Parameter(torch.ones(dim_head))
        self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.to_q(self.norm(x))
        k, v = self.to_kv(x).chunk(2, dim=-1)  # keys/values from the raw input, as the reference
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        q = F.normalize(q, dim=-1) * self.q_scale
        k = F.normalize(k, dim=-1) * self.k_scale
        mask = None if attn_bias is None else attn_bias.to(q.dtype)
        # Sequences are independent: bound the (heads, n, n) score memory by chunking the batch
        # (a full-size CT has 24 slabs x 8 heads x 576^2 spatial scores = 255 MB per copy).
        step = max(1, self.max_score_bytes // (self.heads * n * n * q.element_size()))
        out = torch.cat(
            [
                F.scaled_dot_product_attention(q[i : i + step], k[i : i + step], v[i : i + step], attn_mask=mask, scale=self.scale)
                for i in range(0, b, step)
            ]
        )
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * x


def feed_forward(dim: int, inner: int) -> nn.Sequential:
    """LayerNorm -> Linear -> GEGLU -> (dropout slot) -> Linear; indices match the checkpoint."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner * 2, bias=False),
        GEGLU(),
        nn.Identity(),
        nn.Linear(inner, dim, bias=False),
    )


class EncoderLayer(nn.Module):
    """PEG, self-attention and feed-forward, each residual; registered as "0", "1", "3".

    Slot "2" (cross-attention) is empty in CTViT's encoder, so it has no keys.
    """

    def __init__(self, cfg: CTViTConfig) -> None:
        super().__init__()
        self.add_module("0", PEG(cfg.dim))
        self.add_module("1", Attention(cfg.dim, cfg.heads, cfg.dim_head))
        self.add_module("3", feed_forward(cfg.dim, cfg.ff_inner))

    def forward(self, x: torch.Tensor, video_shape: tuple[int, int, int, int], attn_bias: torch.Tensor | None) -> torch.Tensor:
        peg, attn, ff = self._modules["0"], self._modules["1"], self._modules["3"]
        x = peg(x, video_shape) + x
        x = attn(x, attn_bias) + x
        return ff(x) + x


class FactorizedTransformer(nn.Module):
    def __init__(self, cfg: CTViTConfig, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(depth)])
        self.norm_out = GammaLayerNorm(cfg.dim)

    def forward(
        self, x: torch.Tensor, video_shape: tuple[int, int, int, int], attn_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, video_shape, attn_bias)
        return self.norm_out(x)


class ContinuousPositionBias(nn.Module):
    """Attention bias from an MLP on log-scaled 2-D relative positions (Swin v2 style)."""

    def __init__(self, dim: int, heads: int, hidden_layers: int = 2) -> None:
        super().__init__()
        net = [nn.Sequential(nn.Linear(2, dim), nn.LeakyReLU(0.1))]
        net += [nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(0.1)) for _ in range(hidden_layers - 1)]
        net.append(nn.Linear(dim, heads))
        self.net = nn.ModuleList(net)

    def forward(self, h: int, w: int) -> torch.Tensor:
        """(heads, h*w, h*w) bias for a row-major (h, w) token grid.

        The MLP only sees the (2h-1)(2w-1) distinct offsets and the result is gathered
        per pair: the same numbers as running it on all (hw)^2 pairs like the reference,
        which at 24 x 24 tokens would cost 174 GFLOP and 1.4 GB per forward.
        """
        device = self.net[-1].weight.device
        di, dj = torch.meshgrid(
            torch.arange(-(h - 1), h, device=device), torch.arange(-(w - 1), w, device=device), indexing="ij"
        )
        rel = torch.stack((di, dj), dim=-1).reshape(-1, 2).float()
        rel = torch.sign(rel) * torch.log(rel.abs() + 1)
        for layer in self.net:
            rel = layer(rel)  # ((2h-1)(2w-1), heads)
        ii, jj = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        ii, jj = ii.reshape(-1), jj.reshape(-1)
        index = (ii[:, None] - ii[None, :] + h - 1) * (2 * w - 1) + (jj[:, None] - jj[None, :] + w - 1)
        return rel[index].permute(2, 0, 1)


class ToPatches(nn.Module):
    """(B, C, D, H, W) -> (B, t, h, w, C*pt*p1*p2), patch voxels ordered (c, pt, p1, p2)."""

    def __init__(self, cfg: CTViTConfig) -> None:
        super().__init__()
        self.pt = cfg.temporal_patch_size
        self.p1, self.p2 = cfg.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, hh, ww = x.shape
        t, h, w = d // self.pt, hh // self.p1, ww // self.p2
        x = x.reshape(b, c, t, self.pt, h, self.p1, w, self.p2)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, t, h, w, -1)


class Codebook(nn.Module):
    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("embed", torch.zeros(1, codebook_size, dim))


class CosineVQ(nn.Module):
    """Inference half of vector_quantize_pytorch's cosine-sim VQ: hard argmax, raw codebook rows."""

    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self._codebook = Codebook(codebook_size, dim)

    def forward(self, tokens: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., dim) -> (codebook rows, indices).  Chunked so the similarity matrix stays small."""
        embed = self._codebook.embed[0]
        # float32 even under autocast, as the reference: a bf16 similarity would flip near-ties
        with torch.autocast(tokens.device.type, enabled=False):
            unit = F.normalize(embed.float(), dim=-1)
            flat = F.normalize(tokens.reshape(-1, tokens.shape[-1]).float(), dim=-1)
            idx = torch.cat([(part @ unit.T).argmax(dim=-1) for part in flat.split(chunk)])
        return embed[idx].reshape(tokens.shape), idx.reshape(tokens.shape[:-1])


class CTViT(nn.Module):
    """CTViT encoder: (B, 1, D, H, W) in CT-CLIP's native layout -> quantised (B, t, h, w, dim)."""

    def __init__(self, cfg: CTViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.spatial_rel_pos_bias = ContinuousPositionBias(cfg.dim, cfg.heads, cfg.pos_bias_hidden_layers)
        self.to_patch_emb = nn.Sequential(
            ToPatches(cfg), nn.LayerNorm(cfg.patch_dim), nn.Linear(cfg.patch_dim, cfg.dim), nn.LayerNorm(cfg.dim)
        )
        self.enc_spatial_transformer = FactorizedTransformer(cfg, cfg.spatial_depth)
        self.enc_temporal_transformer = FactorizedTransformer(cfg, cfg.temporal_depth)
        self.vq = CosineVQ(cfg.codebook_size, cfg.dim)

    def check_input(self, x: torch.Tensor, image_hw: tuple[int, int] | None = None) -> None:
        """One-sentence error for a tensor the encoder cannot take (wrong rank or size)."""
        from medalign.core.errors import InputError

        pt, (p1, p2) = self.cfg.temporal_patch_size, self.cfg.patch_size
        if x.ndim != 5 or x.shape[1] != self.cfg.channels:
            raise InputError(f"CTViT expects a (B, 1, D, H, W) tensor, got shape {list(x.shape)}.")
        d, h, w = x.shape[2:]
        if d == 0 or d % pt or h % p1 or w % p2 or (image_hw is not None and (h, w) != tuple(image_hw)):
            want = f"{image_hw[0]} x {image_hw[1]}" if image_hw else f"multiples of {p1} x {p2}"
            raise InputError(
                f"CTViT expects slices of {want} voxels and a slice count that is a multiple of {pt}, got {d} x {h} x {w}."
            )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Patch-embed and run both transformers: the pre-quantisation tokens (B, t, h, w, dim)."""
        # Patch embedding is per token: run it a few slabs at a time so the reordered voxel
        # copy and its LayerNorm never exist for the whole volume at once (2 x 221 MB at full size).
        step = self.cfg.temporal_patch_size * 4
        tokens = torch.cat([self.to_patch_emb(x[:, :, i : i + step]) for i in range(0, x.shape[2], step)], dim=1)
        b, t, h, w, d = tokens.shape
        video_shape = (b, t, h, w)
        bias = self.spatial_rel_pos_bias(h, w)
        tokens = self.enc_spatial_transformer(tokens.reshape(b * t, h * w, d), video_shape, bias)
        tokens = tokens.reshape(b, t, h, w, d).permute(0, 2, 3, 1, 4).reshape(b * h * w, t, d)
        tokens = self.enc_temporal_transformer(tokens, video_shape)
        return tokens.reshape(b, h, w, t, d).permute(0, 3, 1, 2, 4).contiguous()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(quantised tokens (B, t, h, w, dim), codebook indices (B, t, h, w))."""
        return self.vq(self.encode(x))
