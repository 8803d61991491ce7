"""Knowledge-anchored prompt learning in the joint latent space (ViP context + merge, K-MaT anchoring).

Why in the joint space: every family (demo, BrgSA, CT-CLIP, COLIPRI, Merlin) exposes
``text_latents``, ``logits`` and ``token_logits`` over one latent space, so prompts
learned there serve all of them through one code path. Learning prompt *tokens* inside
each family's text transformer would need per-family code and back-propagation through
big frozen text encoders (CXR-BERT, Clinical-Longformer) for every step; here the text
encoder runs once per descriptor and training touches a few vectors per finding.

Per finding f and side s (present, absent):

* descriptors ``e_i``: the knowledge base's visual-symptom sentences and the prompt
  wordings of the side, encoded once with the frozen text encoder (ViP's descriptors);
* context ``c_fs``: a learnable residual added to every descriptor, ``ê_i = norm(e_i + c)``
  (ViP's context prompt, moved from token space to latent space);
* merge query ``q_fs``: attention ``a = softmax(q · ê)`` over the descriptors (ViP's merge
  prompt); the class embedding is ``t = norm(k + Σ a_i ê_i − ē)`` with ``k`` the
  screener's knowledge-ensembled latent and ``ē`` the plain descriptor mean, so an
  untrained adapter (c = 0, q = 0: uniform attention) reproduces zero-shot exactly;
* anchoring (K-MaT): ``1 − cos(t, k)`` keeps the learned classes near their clinical text;
* optimal transport (K-MaT): entropic OT between the side's adapted descriptor set
  (weighted by the merge attention) and the image's pooled patch tokens, cost
  ``1 − cos``; "present" prompts should transport to a positive image more cheaply than
  "absent" ones. Entropic OT (POT's batched Sinkhorn, ``ot.solve_batch``) rather than
  fused Gromov-Wasserstein: it is differentiable by its envelope gradient, batches
  hundreds of small problems in one call on CPU, and a few descriptors carry too little
  internal structure for the Gromov term to add information.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medalign.models.base import ImageFeatures, ScreeningModel

# OT settings: entropy weight on a cost in [0, 2]; at most this many (case, finding)
# pairs per step (random subset), and a pooled token grid of at most 4 per axis.
OT_REG = 0.05
OT_ITERATIONS = 50
OT_PAIRS_PER_STEP = 96
OT_GRID = 4
OT_SCALE = 20.0  # OT cost difference -> logit


class PromptAdapter(nn.Module):
    """Context and merge prompts of F findings over padded descriptor sets (F, 2, M, D)."""

    def __init__(self, anchors: torch.Tensor, descriptors: list[tuple[torch.Tensor, torch.Tensor]],
                 learn_merge: bool = True) -> None:
        super().__init__()
        n_f, _, dim = anchors.shape
        m = max(len(d) for pair in descriptors for d in pair)
        desc = torch.zeros(n_f, 2, m, dim)
        valid = torch.zeros(n_f, 2, m, dtype=torch.bool)
        for f, pair in enumerate(descriptors):
            for s, d in enumerate(pair):
                d = F.normalize(d.float(), dim=-1)
                desc[f, s, : len(d)] = d
                desc[f, s, len(d):] = d[-1]  # padding repeats a real descriptor; its attention is 0
                valid[f, s, : len(d)] = True
        mean = (desc * valid[..., None]).sum(2) / valid.sum(2, keepdim=True)
        self.register_buffer("anchors", F.normalize(anchors.float(), dim=-1))
        self.register_buffer("descriptors", desc)
        self.register_buffer("valid", valid)
        self.register_buffer("descriptor_mean", mean)
        self.context = nn.Parameter(torch.zeros(n_f, 2, dim))
        self.merge_query = nn.Parameter(torch.zeros(n_f, 2, dim), requires_grad=learn_merge)

    def adapted_descriptors(self) -> torch.Tensor:
        """(F, 2, M, D) descriptors with the learned context added, unit length."""
        return F.normalize(self.descriptors + self.context[:, :, None], dim=-1)

    def attention(self, adapted: torch.Tensor) -> torch.Tensor:
        """(F, 2, M) merge-prompt attention over each side's descriptors (padding: 0)."""
        scores = torch.einsum("fsd,fsmd->fsm", self.merge_query, adapted)
        return scores.masked_fill(~self.valid, float("-inf")).softmax(-1)

    def forward(self) -> torch.Tensor:
        """(F, 2, D) adapted present/absent class embeddings, unit length."""
        adapted = self.adapted_descriptors()
        merged = torch.einsum("fsm,fsmd->fsd", self.attention(adapted), adapted)
        return F.normalize(self.anchors + merged - self.descriptor_mean, dim=-1)


def pair_logits(model: ScreeningModel, feats: ImageFeatures, classes: torch.Tensor) -> torch.Tensor:
    """(B, F) present-minus-absent logits of every case and finding for class embeddings (F, 2, D)."""
    n_f = classes.shape[0]
    logits = model.logits(feats, classes.reshape(2 * n_f, -1)).reshape(-1, n_f, 2)
    return logits[..., 0] - logits[..., 1]


def pooled_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """(B, X, Y, Z, D) token latents -> (B, T, D) unit tokens on a grid of at most 4 per axis
    (OT between a few descriptors and thousands of tokens would cost more than it tells)."""
    grid = tuple(min(OT_GRID, n) for n in tokens.shape[1:4])
    pooled = F.adaptive_avg_pool3d(tokens.permute(0, 4, 1, 2, 3).float(), grid)
    return F.normalize(pooled.flatten(2).transpose(1, 2), dim=-1)


def ot_logits(adapter: PromptAdapter, tokens: torch.Tensor, cases: torch.Tensor, findings: torch.Tensor) -> torch.Tensor:
    """(P,) OT scores of (case, finding) pairs: absent-set cost minus present-set cost."""
    import ot

    adapted = adapter.adapted_descriptors()[findings]  # (P, 2, M, D)
    weights = adapter.attention(adapter.adapted_descriptors())[findings].clamp_min(1e-8)
    weights = weights / weights.sum(-1, keepdim=True)
    z = tokens[cases]  # (P, T, D)
    cost = 1.0 - torch.einsum("psmd,ptd->psmt", adapted, z)
    p, _, m, t = cost.shape
    result = ot.solve_batch(cost.reshape(p * 2, m, t), reg=OT_REG, a=weights.reshape(p * 2, m),
                            max_iter=OT_ITERATIONS, tol=1e-4, method="sinkhorn")
    value = result.value.reshape(p, 2)  # the envelope gradient is defined for the regularised value
    return OT_SCALE * (value[:, 1] - value[:, 0])


def adaptation_loss(adapter: PromptAdapter, model: ScreeningModel, feats: ImageFeatures, tokens: torch.Tensor,
                    labels: torch.Tensor, mask: torch.Tensor, weights: dict[str, float],
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Loss terms on the cached K-shot features: ``classify`` (BCE of the pair logits on the
    sampled (case, finding) pairs), ``anchor`` and ``transport`` (weighted by ``weights``),
    and their sum ``total``."""
    classes = adapter()
    y = labels.float()
    scores = pair_logits(model, feats, classes)
    terms = {"classify": F.binary_cross_entropy_with_logits(scores[mask], y[mask])}
    if weights.get("anchor", 0.0) > 0:
        terms["anchor"] = (1.0 - (classes * adapter.anchors).sum(-1)).mean()
    if weights.get("transport", 0.0) > 0:
        cases, findings = mask.nonzero(as_tuple=True)
        if len(cases) > OT_PAIRS_PER_STEP:
            pick = torch.randperm(len(cases), generator=generator)[:OT_PAIRS_PER_STEP]
            cases, findings = cases[pick], findings[pick]
        ot_scores = ot_logits(adapter, tokens, cases, findings)
        terms["transport"] = F.binary_cross_entropy_with_logits(ot_scores, y[cases, findings])
    terms["total"] = terms["classify"] + sum(weights.get(k, 0.0) * v for k, v in terms.items() if k != "classify")
    return terms
