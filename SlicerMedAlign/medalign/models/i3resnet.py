"""I3ResNet: a 2D bottleneck ResNet inflated to 3D, Merlin's image encoder, in plain torch.

Merlin (``merlin-vlm``) builds it by inflating torchvision's ResNet-152: every 3x3 kernel
becomes 3x3x3 with the same stride along the slice axis, every 1x1 kernel 1x1x1, the 7x7
stem 3x7x7 with stride (1, 2, 2), the max-pool 3x3x3 with stride 2.  Only the resulting
shapes matter for loading the published weights, so this module builds the inflated
network directly (no torchvision) under the same attribute names, which makes its
``state_dict`` keys those of the published checkpoint below ``encode_image.i3_resnet.``.

Layout: the network sees (B, C, D, H, W) with D the slices; overall strides are 16 along
D and 32 along H and W, and because every strided kernel is centred (padding = k // 2),
output position i of a stride-s stage is centred on input position s * i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medalign.core.errors import CheckpointError

EXPANSION = 4  # bottleneck: conv3 widens planes four times (torchvision's Bottleneck)
LAYERS = ("layer1", "layer2", "layer3", "layer4")
LAYER_STRIDES = (1, 2, 2, 2)  # torchvision's ResNet: stride in the first block's 3x3 conv


@dataclass(frozen=True)
class I3ResNetConfig:
    """Sizes of an inflated bottleneck ResNet; ResNet-152 is blocks (3, 8, 36, 3), stem 64."""

    blocks: tuple[int, int, int, int] = (3, 8, 36, 3)
    planes: tuple[int, int, int, int] = (64, 128, 256, 512)
    stem: int = 64
    n_classes: int = 1692  # Merlin's phenotype (EHR phecode) head
    dim_latent: int = 512  # contrastive head

    @property
    def dim_features(self) -> int:
        return self.planes[-1] * EXPANSION

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "") -> I3ResNetConfig:
        """Every size read from tensor shapes, so a small test network loads like the real one."""

        def shape(key: str) -> tuple[int, ...]:
            if prefix + key not in sd:
                raise CheckpointError(f"The Merlin checkpoint has no '{prefix + key}' tensor, so it is not an I3ResNet.")
            return tuple(sd[prefix + key].shape)

        blocks, planes = [], []
        for layer in LAYERS:
            ids = {int(k[len(prefix + layer) + 1 :].split(".")[0]) for k in sd if k.startswith(prefix + layer + ".")}
            if not ids:
                raise CheckpointError(f"The Merlin checkpoint has no '{prefix + layer}' blocks, so it is not an I3ResNet.")
            blocks.append(max(ids) + 1)
            planes.append(shape(f"{layer}.0.conv1.weight")[0])
        return cls(
            blocks=tuple(blocks),
            planes=tuple(planes),
            stem=shape("conv1.weight")[0],
            n_classes=shape("classifier.weight")[0],
            dim_latent=shape("contrastive_head.weight")[0],
        )


class Bottleneck3d(nn.Module):
    """1x1x1 -> 3x3x3 (strided) -> 1x1x1 with batch norms and an identity or projected skip."""

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        out = planes * EXPANSION
        self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv3d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm3d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(out.add_(skip), inplace=True)


class I3ResNet(nn.Module):
    """The inflated ResNet trunk plus Merlin's two 1x1x1 heads (phenotypes, contrastive)."""

    stride = (16, 32, 32)  # of the whole trunk along (D, H, W)

    def __init__(self, config: I3ResNetConfig) -> None:
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv3d(3, config.stem, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(config.stem)
        inplanes = config.stem
        for name, n, planes, stride in zip(LAYERS, config.blocks, config.planes, LAYER_STRIDES):
            blocks = [Bottleneck3d(inplanes if i == 0 else planes * EXPANSION, planes, stride if i == 0 else 1) for i in range(n)]
            setattr(self, name, nn.Sequential(*blocks))
            inplanes = planes * EXPANSION
        self.classifier = nn.Conv3d(config.dim_features, config.n_classes, 1, bias=True)
        self.contrastive_head = nn.Conv3d(config.dim_features, config.dim_latent, 1, bias=True)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> stem output.  Merlin feeds the single CT channel three times
        (``torch.cat((x, x, x), 1)``); summing the kernel over its input channels gives the
        same convolution on one copy, with a third of the memory."""
        weight = self.conv1.weight.sum(dim=1, keepdim=True)
        x = F.conv3d(x, weight, None, self.conv1.stride, self.conv1.padding)
        x = F.relu(self.bn1(x), inplace=True)
        return F.max_pool3d(x, kernel_size=3, stride=2, padding=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> last feature map (B, 2048, D/16, H/32, W/32)."""
        x = self.stem(x)
        for name in LAYERS:
            x = getattr(self, name)(x)
        return x


__all__ = ["Bottleneck3d", "I3ResNet", "I3ResNetConfig"]
