"""Primus (Wald et al. 2025): the 3D EVA vision transformer inside COLIPRI's image encoder.

Our own plain-torch rewrite of ``dynamic_network_architectures``' ``Primus`` with its
decoder removed (COLIPRI replaces ``up_projection`` by an identity), built on timm's EVA
blocks as that package configures them: a Conv3d patch embedding, no absolute position
table, 3D rotary positions (timm ``RotaryEmbeddingCat``, interleaved pairs, frequencies
``1 / 10000^(i / n)`` over integer token coordinates), pre-norm blocks with separate
q/k/v projections (no k bias), a LayerNorm on the attention output ("scale_attn_inner"),
a SwiGLU MLP with a LayerNorm before ``fc2``, LayerScale ``gamma_1``/``gamma_2``, and a
final LayerNorm.  Module names follow the original so its state dict loads key for key.

Why a rewrite: the product must not import timm/dynamic_network_architectures (their
torchvision dependency breaks ``transformers`` on CPU-only installs), and the encoder is
small enough to own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medalign.core.errors import CheckpointError, InputError

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class PrimusConfig:
    """Sizes of a Primus encoder; the published COLIPRI one is the defaults (Primus-M at 192³)."""

    embed_dim: int = 864
    depth: int = 16
    num_heads: int = 12
    patch_size: Triple = (8, 8, 8)
    input_size: Triple = (192, 192, 192)
    mlp_hidden: int = 2304  # int(embed_dim * 4 * 2 / 3)
    in_channels: int = 1

    @property
    def grid(self) -> Triple:
        """Tokens along x, y, z; the rotary table is built for exactly this grid."""
        return tuple(s // p for s, p in zip(self.input_size, self.patch_size))  # type: ignore[return-value]

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def check(self) -> None:
        """One sentence for sizes the architecture cannot have (Primus' own asserts)."""
        if self.embed_dim % self.num_heads:
            raise CheckpointError(f"Primus width {self.embed_dim} is not divisible by {self.num_heads} heads.")
        if self.head_dim % 6 or (self.head_dim * 2 // 3) % 4:
            raise CheckpointError(
                f"Primus head width {self.head_dim} does not split into 3D rotary bands (it must be a multiple of 6 "
                "whose two thirds are a multiple of 4)."
            )
        if any(s % p for s, p in zip(self.input_size, self.patch_size)):
            raise CheckpointError(f"Primus input size {self.input_size} is not a multiple of the patch {self.patch_size}.")

    @classmethod
    def from_state_dict(
        cls, sd: dict[str, torch.Tensor], prefix: str, num_heads: int, input_size: Triple
    ) -> PrimusConfig:
        """Every size the tensors fix; ``num_heads`` and ``input_size`` are not in any shape."""
        key = prefix + "down_projection.proj.weight"
        if key not in sd or sd[key].ndim != 5:
            raise CheckpointError(f"The checkpoint has no 5-d '{key}' tensor, so it holds no Primus encoder.")
        embed_dim, in_channels, *patch = sd[key].shape
        blocks = prefix + "eva.blocks."
        depth = len({k[len(blocks):].split(".")[0] for k in sd if k.startswith(blocks)})
        fc1 = sd.get(blocks + "0.mlp.fc1_g.weight")
        config = cls(
            embed_dim=int(embed_dim), depth=depth, num_heads=int(num_heads), patch_size=tuple(int(p) for p in patch),
            input_size=tuple(int(s) for s in input_size), mlp_hidden=int(fc1.shape[0]) if fc1 is not None else 0,
            in_channels=int(in_channels),
        )
        config.check()
        return config


def rotary_table(grid: Triple, head_dim: int) -> torch.Tensor:
    """(N, 2 * head_dim) = [sin | cos] per token, exactly timm's ``RotaryEmbeddingCat(in_pixels=False)``.

    Each of the 3 axes gets ``head_dim / 6`` frequencies, each repeated for an interleaved
    (even, odd) channel pair, so the table covers the whole head.  Token order is x-major
    (x slowest, z fastest), as the patch sequence.
    """
    n_bands = (head_dim * 2 // 3) // 4
    exponent = torch.arange(0, n_bands, dtype=torch.int64).to(torch.float32) / n_bands
    bands = 1.0 / (10000.0**exponent)
    coords = [torch.arange(s, dtype=torch.int64).to(torch.float32) / s * s for s in grid]  # timm's ref-shape rescale
    pos = torch.stack(torch.meshgrid(coords, indexing="ij"), dim=-1).unsqueeze(-1) * bands  # (X, Y, Z, 3, bands)
    n = math.prod(grid)
    sin = pos.sin().reshape(n, -1).repeat_interleave(2, -1)
    cos = pos.cos().reshape(n, -1).repeat_interleave(2, -1)
    return torch.cat([sin, cos], dim=-1)


def apply_rotary(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs: x*cos + rot(x)*sin with rot([a, b]) = [-b, a]."""
    sin, cos = table.chunk(2, dim=-1)
    rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)
    return x * cos + rotated * sin


class EvaAttention(nn.Module):
    """Multi-head self-attention with rotary q/k, no k bias and a LayerNorm before ``proj``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, self.num_heads, -1).transpose(1, 2)

        q = apply_rotary(heads(self.q_proj(x)), rope)
        k = apply_rotary(heads(self.k_proj(x)), rope)
        out = F.scaled_dot_product_attention(q, k, heads(self.v_proj(x)))
        return self.proj(self.norm(out.transpose(1, 2).reshape(b, n, c)))


class SwiGLU(nn.Module):
    """silu(fc1_g x) * fc1_x x -> LayerNorm -> fc2 (timm ``SwiGLU`` with ``norm_layer``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(F.silu(self.fc1_g(x)) * self.fc1_x(x)))


class EvaBlock(nn.Module):
    """Pre-norm transformer block with LayerScale on both branches."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.gamma_1 = nn.Parameter(torch.full((dim,), 0.1))
        self.gamma_2 = nn.Parameter(torch.full((dim,), 0.1))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EvaAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        x = x + self.gamma_1 * self.attn(self.norm1(x), rope)
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class Eva(nn.Module):
    """The block stack and final norm; the rotary table is a non-persistent buffer, as in timm."""

    def __init__(self, config: PrimusConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            EvaBlock(config.embed_dim, config.num_heads, config.mlp_hidden) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.embed_dim)
        self.config = config
        self.register_buffer("rope", rotary_table(config.grid, config.head_dim), persistent=False)

    def reset_rope(self) -> None:
        """Recompute the rotary table (after building on the meta device, where it holds no values)."""
        self.rope = rotary_table(self.config.grid, self.config.head_dim).to(self.norm.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rope = self.rope.to(x.dtype)
        for block in self.blocks:
            x = block(x, rope)
        return self.norm(x)


class PatchEmbed(nn.Module):
    def __init__(self, config: PrimusConfig) -> None:
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv3d(config.in_channels, config.embed_dim, kernel_size=p, stride=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Primus(nn.Module):
    """(B, C, X, Y, Z) image -> (B, embed_dim, X/px, Y/py, Z/pz) patch embeddings (decoder removed)."""

    def __init__(self, config: PrimusConfig) -> None:
        super().__init__()
        config.check()
        self.config = config
        self.down_projection = PatchEmbed(config)
        self.eva = Eva(config)
        # kept only so the state dict matches the original key for key (used in MAE pre-training)
        self.register_buffer("mask_token", torch.zeros(1, 1, config.embed_dim))

    def check_input(self, x: torch.Tensor) -> None:
        want = (self.config.in_channels, *self.config.input_size)
        if x.ndim != 5 or tuple(x.shape[1:]) != want:
            raise InputError(
                f"The Primus encoder takes (B, {', '.join(map(str, want))}) images, got shape {list(x.shape)}."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.down_projection(x)
        b, c, gx, gy, gz = x.shape
        tokens = self.eva(x.flatten(2).transpose(1, 2))  # x-major sequence, as "b c w h d -> b (w h d) c"
        return tokens.transpose(1, 2).reshape(b, c, gx, gy, gz)


__all__ = ["Primus", "PrimusConfig", "apply_rotary", "rotary_table"]
