"""Text anchors fixed before any image is seen: the projection of the frozen sentence
encoder is fitted on the finding sentences alone, then frozen."""

from __future__ import annotations

import torch

from medalign.models.medalign_model import MedAlignModel
from medalign.training.losses import decision_directions, direction_overlap, supcon_loss


def warm_up_text_projection(model: MedAlignModel, pos_raw: list[torch.Tensor], neg_raw: list[torch.Tensor],
                            steps: int = 300, lr: float = 3e-3, decorrelate: float = 0.0) -> float:
    """Separate "finding present" from "finding absent" in the joint space before any image
    is seen, then freeze the projection.

    The frozen sentence encoder puts "X" and "no X" close together (cosine about 0.8), so a
    jointly trained projection starts with nearly equal positive and negative latents and
    the image encoder gets almost no gradient from the present/absent decision.  Fixing
    2F well-separated text anchors first (supervised contrastive over the 2F classes of
    training sentences) gives the image side a clear target from the first step.

    Separated anchors are not enough: every "X" shares an "abnormal" component and every
    "no X" a "negated" one, so the findings' present-minus-absent directions stay nearly
    parallel (demo model 4: mean cosine 0.68, lung nodule vs lung opacity 0.95), and a
    finding the image side has not learned yet scores whatever the others do.  With
    ``decorrelate`` > 0 their squared cosines are penalised too (``direction_overlap``).
    """
    x = torch.cat(pos_raw + neg_raw)
    n_f = len(pos_raw)
    y = torch.cat([torch.full((len(t),), j) for j, t in enumerate(pos_raw)] +
                  [torch.full((len(t),), n_f + j) for j, t in enumerate(neg_raw)]).to(x.device)
    opt = torch.optim.Adam(model.text_proj.parameters(), lr=lr)
    contrast = torch.tensor(0.0)
    for _ in range(steps):
        z = model.project_text(x)
        contrast = supcon_loss(z, y)
        loss = contrast + decorrelate * direction_overlap(decision_directions(z, y, n_f)) if decorrelate else contrast
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.text_proj.requires_grad_(False)
    return float(contrast.detach())  # the supervised contrastive part, as the training log reports it
