"""Few-shot adaptation: learn an adapter for a frozen model from K labelled cases per finding.

The encoders never train: the K-shot cases are encoded once (``Screener.features``, the
exact screening path) and kept in memory, then only the prompt adapter's few vectors per
finding learn (``medalign.training.prompt_adapter``), so a run takes seconds to minutes on
a CPU. The result is an ``inference.adapter.Adapter`` tied to the model's weights.

K shots = K cases with the finding and K without, per finding, drawn with the seed.
Cases already drawn for earlier findings are reused first, so the set of scans to encode
stays small; each finding's loss still sees exactly its own K + K cases.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medalign.core.errors import InputError
from medalign.inference.adapter import METHODS, Adapter
from medalign.models.base import ImageFeatures

# loss weights per method: ViP alone learns context + merge on the classification loss;
# K-MaT anchors the learned classes and aligns prompt sets with patches by OT. The anchor
# weight was chosen on shifted phantoms (Testing/benchmarks/adapt_shots.py, demo model):
# at 1 shot, weight 1 lost 0.053 macro AUC, 5 lost 0.020, 20 lost 0.006; 1 - cos moves
# little while a few cases are easy to fit, so the anchor has to weigh heavily.
METHOD_WEIGHTS: dict[str, dict[str, float]] = {
    "vip": {},
    "kmat": {"anchor": 20.0, "transport": 0.1},
    "vip+kmat": {"anchor": 20.0, "transport": 0.1},
}
SYMPTOM_SENTENCES = {
    "density": "On CT, {finding} shows {text}.",
    "shape": "On CT, {finding} appears as {text}.",
    "location": "On CT, {finding} lies {text}.",
}


@dataclass
class AdaptResult:
    adapter: Adapter
    losses: list[float] = field(default_factory=list)  # total loss per epoch
    cases: list[str] = field(default_factory=list)  # the encoded case ids


def sample_shots(labels: torch.Tensor, shots: int, seed: int, findings: Sequence[str]) -> tuple[list[int], torch.Tensor]:
    """(case indices to encode, (n, F) mask of which case trains which finding): exactly
    ``shots`` present and ``shots`` absent cases per finding; too few is one sentence."""
    if shots < 1:
        raise InputError(f"--shots must be at least 1 (K cases with and K without each finding), not {shots}.")
    short = [f"{name} ({int((labels[:, j] == 1).sum())} with, {int((labels[:, j] == 0).sum())} without)"
             for j, name in enumerate(findings) if min(int((labels[:, j] == 1).sum()), int((labels[:, j] == 0).sum())) < shots]
    if short:
        raise InputError(f"{shots} shots need {shots} labelled cases with and {shots} without each finding; too few for "
                         f"{'; '.join(short[:4])}{' ...' if len(short) > 4 else ''}: lower --shots or leave those out with --findings.")
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    pairs: list[tuple[int, int]] = []
    for j in range(len(findings)):
        for value in (1, 0):
            pool = [int(i) for i in torch.nonzero(labels[:, j] == value).flatten()]
            reuse = [i for i in chosen if i in set(pool)]
            fresh = [i for i in rng.permutation(pool).tolist() if i not in set(chosen)]
            picked = (reuse + fresh)[:shots]
            chosen += [i for i in picked if i not in set(chosen)]
            pairs += [(i, j) for i in picked]
    row = {case: n for n, case in enumerate(chosen)}
    mask = torch.zeros(len(chosen), len(findings), dtype=torch.bool)
    for case, j in pairs:
        mask[row[case], j] = True
    return chosen, mask


def symptom_descriptors(finding: str) -> list[str]:
    """The knowledge base's visual-symptom sentences of ``finding`` (none for free text)."""
    from medalign.knowledge.findings import SYMPTOM_KEYS, find

    info = find(finding)
    if info is None:
        return []
    name = info.name if info.name.isupper() else info.name.lower()
    return [SYMPTOM_SENTENCES[k].format(finding=name, text=info.symptoms[k]) for k in SYMPTOM_KEYS if info.symptoms.get(k)]


@torch.no_grad()
def descriptor_sets(screener) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per finding: present descriptors (the positive wordings + symptom sentences) and
    absent descriptors (the negative wordings, the knowledge's negations among them)."""
    symptoms = [symptom_descriptors(p.finding) for p in screener.prompts]
    flat = [s for group in symptoms for s in group]
    encoded = screener.model.text_latents(flat).float() if flat else None
    out, at = [], 0
    for p, group in zip(screener.prompts, symptoms):
        extra = encoded[at: at + len(group)].to(p.positive.device) if group else p.positive[:0]
        at += len(group)
        out.append((torch.cat([p.positive.float(), extra]), p.negative.float()))
    return out


def encode_cases(screener, paths: Sequence[Path], progress: bool = True) -> tuple[ImageFeatures, torch.Tensor]:
    """Frozen features of every case, once: (stacked ImageFeatures, pooled OT tokens)."""
    from tqdm import tqdm

    from medalign.core.volume_io import read_volume
    from medalign.training.prompt_adapter import pooled_tokens

    globals_, tokens = [], []
    for path in tqdm(paths, desc="encoding shots", unit="ct", disable=not progress):
        feats = screener.features(read_volume(path))
        globals_.append(feats.global_latent.detach())
        tokens.append(feats.tokens.detach())
    feats = ImageFeatures(torch.cat(globals_), torch.cat(tokens))
    return feats, pooled_tokens(feats.tokens)


def train_adapter(model, feats: ImageFeatures, tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                  anchors: torch.Tensor, descriptors, method: str = "vip+kmat", epochs: int = 50, lr: float = 0.01,
                  seed: int = 0, progress: bool = True, on_epoch: Callable[[int, dict], None] | None = None):
    """Fit a ``PromptAdapter`` on cached features (full batch per epoch); the model's own
    parameters are frozen for the run and their ``requires_grad`` restored afterwards.
    Returns (adapter, total loss per epoch)."""
    from tqdm import tqdm

    from medalign.training.prompt_adapter import PromptAdapter, adaptation_loss

    if method not in METHODS:
        raise InputError(f"Unknown adaptation method '{method}' (choose from {', '.join(METHODS)}).")
    if epochs < 1:
        raise InputError(f"--epochs must be at least 1, not {epochs}.")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    device = feats.global_latent.device
    adapter = PromptAdapter(anchors, descriptors, learn_merge=method != "kmat").to(device)
    optimiser = torch.optim.Adam([p for p in adapter.parameters() if p.requires_grad], lr=lr)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    losses: list[float] = []
    try:
        bar = tqdm(range(epochs), desc=f"adapting ({method})", unit="epoch", disable=not progress)
        for epoch in bar:
            terms = adaptation_loss(adapter, model, feats, tokens, labels.to(device), mask.to(device),
                                    METHOD_WEIGHTS[method], generator)
            optimiser.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimiser.step()
            losses.append(float(terms["total"].detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if on_epoch is not None:
                on_epoch(epoch, {k: float(v.detach()) for k, v in terms.items()})
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    return adapter.eval(), losses


def support_calibration(model, adapter, feats: ImageFeatures, labels: torch.Tensor, mask: torch.Tensor,
                        findings: Sequence[str], data: str, shots: int):
    """Flag thresholds for the adapted scores, picked on the K-shot cases (ROC point nearest
    (0, 1)): the model's own thresholds belong to its zero-shot scores. No held-out AUC is
    claimed: the support set is what the adapter learned from."""
    from medalign.evaluation.metrics import youden_nearest_threshold
    from medalign.models.calibration import Calibration, FindingCalibration
    from medalign.training.prompt_adapter import pair_logits

    with torch.no_grad():
        probs = torch.sigmoid(pair_logits(model, feats, adapter())).cpu().numpy()
    fitted = {}
    for j, name in enumerate(findings):
        rows = mask[:, j].numpy()
        threshold = youden_nearest_threshold(labels[rows, j].numpy(), probs[rows, j])
        fitted[name] = FindingCalibration(threshold=round(float(threshold), 4))
    return Calibration(fitted, f"{data} ({shots}-shot support set)")


def adapt(data: str | Path, shots: int, model=None, findings: Sequence[str] | str | None = None,
          method: str = "vip+kmat", epochs: int = 50, seed: int = 0, device: str = "auto", lr: float = 0.01,
          progress: bool = True) -> AdaptResult:
    """Learn an adapter for ``model`` (registry name or model object) from ``shots`` cases
    with and without each finding of the labelled cohort ``data``."""
    from medalign.data.cohorts import load_cohort
    from medalign.data.labels import resolve_labels
    from medalign.inference.screener import Screener
    from medalign.knowledge.findings import CT_RATE_FINDINGS, parse_findings

    if method not in METHODS:
        raise InputError(f"Unknown adaptation method '{method}' (choose from {', '.join(METHODS)}).")
    cases = [c for c in load_cohort(data) if c.labels is not None or c.report]
    if not cases:
        raise InputError(f"{data} has no labels.csv or reports.csv to adapt on.")
    names = parse_findings(findings) if findings else _labelled(cases, CT_RATE_FINDINGS)
    labels = resolve_labels(cases, names)
    chosen, mask = sample_shots(labels, shots, seed, names)
    screener = Screener(model=model, findings=names, device=device)
    feats, tokens = encode_cases(screener, [cases[i].volume_path for i in chosen], progress)
    chosen_labels = labels[chosen]
    anchors = torch.stack([p.ensemble for p in screener.prompts]).float()
    adapter, losses = train_adapter(screener.model, feats, tokens, chosen_labels, mask, anchors, descriptor_sets(screener),
                                    method=method, epochs=epochs, lr=lr, seed=seed, progress=progress)
    name, sha, registered = screener.fingerprint()
    with torch.no_grad():
        tensors = {"class_latents": adapter(), "context": adapter.context, "merge_query": adapter.merge_query}
    result = Adapter(
        model=name, model_sha256=sha, family=screener.model.family, method=method, shots=shots,
        findings=list(screener.findings), tensors={k: v.detach().cpu() for k, v in tensors.items()},
        data=str(data), registered=registered,
        calibration=support_calibration(screener.model, adapter, feats, chosen_labels, mask, screener.findings, str(data), shots),
        info={"epochs": epochs, "seed": seed, "lr": lr, "cases": len(chosen), "initial_loss": losses[0],
              "final_loss": losses[-1]},
    )
    return AdaptResult(result, losses, [cases[i].case_id for i in chosen])


def _labelled(cases, order: Sequence[str]) -> list[str]:
    """The CT-RATE findings the cohort labels (labels.csv columns), else all 18."""
    seen = set().union(*(c.labels.keys() for c in cases if c.labels)) if any(c.labels for c in cases) else set()
    return [f for f in order if f in seen] or list(order)
