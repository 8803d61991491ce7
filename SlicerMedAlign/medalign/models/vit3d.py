"""A configurable 3D Vision Transformer whose parameter names follow timm's ViT.

BrgSA's ``ViT3D`` (timm 0.9 ``Block``s on Conv3d patches) stores exactly these keys, so the
same module loads BrgSA checkpoints and serves as the demo model's image encoder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ViT3DConfig:
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    patch_size: tuple[int, int, int] = (16, 16, 8)
    base_size: tuple[int, int, int] = (224, 224, 112)  # input size the position table was made for
    block_eps: float = 1e-6
    final_eps: float = 1e-5
    in_channels: int = 1  # >1 when a convolutional stem feeds the patch embedding

    @property
    def base_grid(self) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(self.base_size, self.patch_size))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ViT3DConfig:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, width * 3, bias=True)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed3D(nn.Module):
    def __init__(self, width: int, patch_size: tuple[int, int, int], in_channels: int = 1) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # (B, C, X', Y', Z')


def sincos_position_table(grid: tuple[int, int, int], width: int) -> torch.Tensor:
    """3D sin-cos table (1 + prod(grid), width) with a zero row for the class token."""
    dim = width // 6 * 2  # per-axis share, even
    omega = 1.0 / (10000 ** (torch.arange(dim // 2, dtype=torch.float32) / (dim // 2)))
    axes = torch.meshgrid(*[torch.arange(g, dtype=torch.float32) for g in grid], indexing="ij")
    parts = []
    for a in axes:
        ang = a.reshape(-1, 1) * omega
        parts += [torch.sin(ang), torch.cos(ang)]
    table = torch.cat(parts, dim=1)
    table = F.pad(table, (0, width - table.shape[1]))
    return torch.cat([torch.zeros(1, width), table], dim=0)


class ViT3D(nn.Module):
    """Class token + Conv3d patch tokens -> pre-norm transformer -> final LayerNorm.

    The position table is stored for ``base_grid`` and resized trilinearly to whatever
    token grid the input yields, so one checkpoint serves any input size.
    """

    def __init__(self, cfg: ViT3DConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed3D(cfg.width, cfg.patch_size, cfg.in_channels)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        n = 1
        for g in cfg.base_grid:
            n *= g
        self.pos_embed = nn.Parameter(sincos_position_table(cfg.base_grid, cfg.width).unsqueeze(0))
        assert self.pos_embed.shape[1] == n + 1
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_dim, cfg.block_eps) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.final_eps)
        nn.init.normal_(self.cls_token, std=0.02)

    def position_table(self, grid: tuple[int, int, int]) -> torch.Tensor:
        base = self.cfg.base_grid
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        if tuple(grid) != tuple(base):
            p = patch_pos.reshape(1, *base, -1).permute(0, 4, 1, 2, 3)
            p = F.interpolate(p, size=tuple(grid), mode="trilinear", align_corners=False)
            patch_pos = p.permute(0, 2, 3, 4, 1).reshape(1, -1, p.shape[1])
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        """(B, 1, X, Y, Z) -> (class token (B, C), patch tokens (B, N, C), token grid)."""
        t = self.patch_embed(x)
        grid = tuple(t.shape[2:])
        t = t.flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.position_table(grid)
        for blk in self.blocks:
            t = blk(t)
        t = self.norm(t)
        return t[:, 0], t[:, 1:], grid
