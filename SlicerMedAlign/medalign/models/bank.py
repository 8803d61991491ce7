"""The knowledge bank of the BrgSA design (cross-modal knowledge interaction, CMKI).

Image and text latents are both re-expressed as soft combinations of shared bank
entries, x_hat = softmax(x D^T) D, which bridges the modality gap.  Key name
``dictionary.weight`` matches BrgSA's ``SharedDictionaryLearning``.
"""

from __future__ import annotations

import torch
from torch import nn


class KnowledgeBank(nn.Module):
    def __init__(self, size: int, width: int) -> None:
        super().__init__()
        self.dictionary = nn.Embedding(size, width)
        nn.init.orthogonal_(self.dictionary.weight)

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x @ self.dictionary.weight.T, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct ``x`` (..., width) from the bank."""
        return self.coefficients(x) @ self.dictionary.weight
