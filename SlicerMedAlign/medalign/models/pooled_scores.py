"""Scores of a model whose image embedding is a linear map of pooled per-token features.

CT-CLIP (``to_visual_latent`` over the flattened tokens) and Merlin (its linear head over
the averaged last feature grid) both score a text by a scaled cosine with that embedding.
Because the embedding is a sum of per-token contributions, the logit splits exactly into
per-token shares, which are the local alignment map: the shares add up to the logit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medalign.models.base import ImageFeatures


def scaled_cosine_logits(feats: ImageFeatures, text: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """(B, N) = scale * cos(image embedding, text embedding)."""
    image = F.normalize(feats.global_latent, dim=-1)
    return scale * image @ F.normalize(text, dim=-1).T


def token_shares(feats: ImageFeatures, text: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """(B, N, X', Y', Z') per-token shares of ``scaled_cosine_logits``; ``feats.tokens`` must
    sum to ``feats.global_latent`` (each token's contribution, any bias share included)."""
    norm = feats.global_latent.norm(dim=-1).clamp_min(1e-12)  # F.normalize's denominator
    shares = torch.einsum("bxyzl,nl->bnxyz", feats.tokens, F.normalize(text, dim=-1))
    return shares * (scale / norm).view(-1, 1, 1, 1, 1)


__all__ = ["scaled_cosine_logits", "token_shares"]
