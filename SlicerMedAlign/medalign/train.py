"""Training: image-report contrastive learning with BrgSA's bank losses, plus finding
prompts, on any cohort of CT volumes with reports (phantoms or a researcher's own).

Losses per batch (all on L2-normalised joint-space latents):
* finding prompts: for every finding with a label, a random training wording of
  "present" and of "absent" is scored against the image; cross-entropy over the pair
  teaches the zero-shot decision rule the screener uses;
* image-report InfoNCE (CLIP) on the global latent, and the same on the bank-bridged
  latents (temperature 1/10, BrgSA's temp3);
* bank reconstruction MSE (weight 0.5), BrgSA's knowledge-bank loss.
The text encoder is frozen, so every sentence is embedded once and cached.
Single process, or several through ``torchrun`` (DistributedDataParallel).
"""

from __future__ import annotations

import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .datasets import Case, load_cohort
from .errors import InputError
from .models.base import ImageFeatures
from .models.medalign_model import MedAlignConfig, MedAlignModel, build_text_encoder, save_checkpoint

# Training wording: disjoint from the inference templates (models.medalign_model.PROMPT_TEMPLATES)
# and from the knowledge base's negation templates, so evaluation measures unseen wordings.
TRAIN_TEMPLATES = {
    "positive": [
        "{finding}.",
        "{finding} is noted.",
        "{finding} is observed.",
        "Presence of {finding}.",
        "The scan shows {finding}.",
        "{finding} was detected.",
        "Evidence of {finding}.",
        "Compatible with {finding}.",
    ],
    "negative": [
        "No {finding}.",
        "{finding} is absent.",
        "Without {finding}.",
        "{finding} was not detected.",
        "The scan shows no {finding}.",
        "Absence of {finding}.",
        "Negative for {finding}.",
        "Free of {finding}.",
    ],
}


@dataclass
class TrainConfig:
    data: Path
    out: Path
    steps: int = 1200
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup: int = 60
    seed: int = 0
    clip_weight: float = 0.5
    mse_weight: float = 0.5
    val_data: Path | None = None
    resume: bool = True
    save_every: int = 200
    device: str = "auto"
    cache: Path | None = None
    findings: list[str] | None = None
    model_config: MedAlignConfig = field(default_factory=MedAlignConfig)


def finding_sentences(finding: str, kb=None) -> tuple[list[str], list[str]]:
    """Training positives/negatives: TRAIN_TEMPLATES filled with the name and its synonyms."""
    from .knowledge import find

    k = find(finding, kb)
    names = [finding] + ([s for s in k.synonyms[:4]] if k is not None else [])
    def fill(tpl: str, name: str) -> str:
        text = tpl.format(finding=name if tpl.startswith("{") else name.lower())
        return text[0].upper() + text[1:]
    pos = [fill(t, n) for n in names for t in TRAIN_TEMPLATES["positive"]]
    neg = [fill(t, n) for n in names for t in TRAIN_TEMPLATES["negative"]]
    return pos, neg


def report_sentences(report: str) -> list[str]:
    parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", report or "") if len(s.strip()) > 3]
    return parts or [report or ""]


# ------------------------------------------------------------------ distributed
def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def _setup_distributed(device: torch.device) -> tuple[int, int]:
    world, rank, _ = _dist_info()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return world, rank


# ------------------------------------------------------------------ data
class PreparedCohort:
    """Cases preprocessed once to the model grid (float16 on CPU), cached on disk if asked."""

    def __init__(self, cases: list[Case], profile, cache: Path | None, progress: bool) -> None:
        from tqdm import tqdm

        from .io import read_volume
        from .preprocess import prepare

        self.cases = cases
        self.images: list[torch.Tensor] = []
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
        for case in tqdm(cases, desc="preprocessing", disable=not progress, unit="ct"):
            cached = cache / f"{case.case_id}.{profile.name}.pt" if cache is not None else None
            if cached is not None and cached.is_file():
                self.images.append(torch.load(cached, weights_only=True))
                continue
            tensor = prepare(read_volume(case.volume_path), profile).tensor[0].to(torch.float16).contiguous()
            if cached is not None:
                tmp = cached.with_suffix(".tmp")
                torch.save(tensor, tmp)
                os.replace(tmp, cached)
            self.images.append(tensor)

    def __len__(self) -> int:
        return len(self.cases)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Cheap, label-preserving jitter: a few voxels of shift and a small intensity change."""
    shifts = [int(v) for v in torch.randint(-3, 4, (3,), generator=gen)]
    x = torch.roll(x, shifts=shifts, dims=(-3, -2, -1))
    scale = 1.0 + 0.05 * (torch.rand(1, generator=gen).item() - 0.5)
    return x * scale + 0.02 * torch.randn(x.shape, generator=gen)


def resolve_labels(cases: list[Case], findings: list[str]) -> torch.Tensor:
    """(N, F) labels: labels.csv where present, else read from the report; -1 = unknown."""
    from .reports import label_report

    out = torch.full((len(cases), len(findings)), -1, dtype=torch.long)
    for i, c in enumerate(cases):
        labels = c.labels if c.labels is not None else (label_report(c.report, findings) if c.report else None)
        if labels is None:
            continue
        for j, f in enumerate(findings):
            if f in labels:
                out[i, j] = int(labels[f])
    return out


# ------------------------------------------------------------------ losses
def clip_loss(a: torch.Tensor, b: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    logits = scale * a @ b.T
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def train(cfg: TrainConfig, progress: bool = True, log=print) -> Path:
    """Train (or resume) a MedAlign model; returns the checkpoint path."""
    from tqdm import tqdm

    from .device import configure_cpu_threads, resolve_device
    from .knowledge import CT_RATE_FINDINGS

    configure_cpu_threads()
    device = resolve_device(cfg.device)
    world, rank = _setup_distributed(device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", _dist_info()[2])
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + rank)

    cases = load_cohort(cfg.data, require_reports=True)
    findings = cfg.findings or [f for f in CT_RATE_FINDINGS if any(c.labels and f in c.labels for c in cases)] or list(CT_RATE_FINDINGS)
    labels = resolve_labels(cases, findings)
    keep = [j for j in range(len(findings)) if (labels[:, j] == 1).any() and (labels[:, j] == 0).any()]
    if not keep:
        raise InputError(f"No finding in {cfg.data} has both positive and negative cases; nothing to learn from.")
    findings = [findings[j] for j in keep]
    labels = labels[:, keep]

    model = MedAlignModel(cfg.model_config).to(device)
    text_encoder = build_text_encoder(None, cfg.model_config)
    cohort = PreparedCohort(cases, cfg.model_config.profile, cfg.cache, progress and rank == 0)

    # Cached frozen-text embeddings: finding sentences and report sentences.
    pos_raw, neg_raw = [], []
    for f in findings:
        p, n = finding_sentences(f)
        pos_raw.append(text_encoder.embed(p))
        neg_raw.append(text_encoder.embed(n))
    report_raw = torch.stack([text_encoder.embed(report_sentences(c.report or "")).mean(0) for c in cases])
    pos_raw = [t.to(device) for t in pos_raw]
    neg_raw = [t.to(device) for t in neg_raw]
    report_raw = report_raw.to(device)

    params = [p for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))
    )
    state_path = cfg.out.with_suffix(".train_state.pt")
    start_step = 0
    if cfg.resume and state_path.is_file() and cfg.out.is_file():
        from .models.medalign_model import load_state_strict, read_checkpoint

        _, tensors, _ = read_checkpoint(cfg.out)
        load_state_strict(model, tensors, cfg.out.name)
        state = torch.load(state_path, weights_only=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
        gen.set_state(state["generator"])
        log(f"resumed from step {start_step}")

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    n = len(cohort)
    indices = list(range(rank, n, world))  # each rank sees its shard
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="training",
               disable=not (progress and rank == 0))
    model.train()
    history: list[float] = []
    t0 = time.time()
    for step in bar:
        pick = torch.randint(0, len(indices), (cfg.batch_size,), generator=gen)
        idx = [indices[int(i)] for i in pick]
        x = torch.stack([_augment(cohort.images[i].float(), gen) for i in idx]).to(device)
        y = labels[idx].to(device)  # (B, F)
        g, tokens = net(x)
        feats = ImageFeatures(global_latent=g, tokens=tokens)

        # finding prompts: one random wording per side and finding for this step
        pi = [int(torch.randint(0, len(t), (1,), generator=gen)) for t in pos_raw]
        ni = [int(torch.randint(0, len(t), (1,), generator=gen)) for t in neg_raw]
        t_pos = model.project_text(torch.stack([pos_raw[j][pi[j]] for j in range(len(findings))]))
        t_neg = model.project_text(torch.stack([neg_raw[j][ni[j]] for j in range(len(findings))]))
        logits = model.logits(feats, torch.cat([t_pos, t_neg]))  # (B, 2F)
        pair = torch.stack([logits[:, : len(findings)], logits[:, len(findings) :]], dim=-1)  # (B, F, 2)
        known = y >= 0
        target = (1 - y).clamp(0, 1)  # class 0 = present, class 1 = absent
        loss_find = F.cross_entropy(pair[known], target[known]) if known.any() else logits.sum() * 0

        # image-report contrastive + BrgSA bank losses
        v = F.normalize(feats.global_latent, dim=-1)
        r = model.project_text(report_raw[idx])
        v_hat, r_hat = model.bank(v), model.bank(r)
        loss_clip = clip_loss(v, r, model.log_scale.exp()) + clip_loss(F.normalize(v_hat, dim=-1), F.normalize(r_hat, dim=-1), 10.0)
        loss_mse = F.mse_loss(v_hat, v) + F.mse_loss(r_hat, r)
        loss = loss_find + cfg.clip_weight * loss_clip + cfg.mse_weight * loss_mse

        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.log_scale.clamp_(0.0, math.log(100.0))
        history.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(history[-20:]):.3f}", find=f"{float(loss_find.detach()):.3f}")
        if rank == 0 and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            _save(model, opt, sched, gen, step + 1, cfg, findings, history, time.time() - t0)
    bar.close()
    if world > 1:
        dist.barrier()
    return cfg.out


def _save(model, opt, sched, gen, step: int, cfg: TrainConfig, findings: list[str], history: list[float], seconds: float) -> None:
    extra = {
        "trained_findings": findings,
        "steps": step,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "data": str(cfg.data),
        "initial_loss": float(np.mean(history[:20])) if history else None,
        "final_loss": float(np.mean(history[-20:])) if history else None,
        "train_seconds": round(seconds, 1),
    }
    save_checkpoint(model, cfg.out, extra=extra)
    state_path = cfg.out.with_suffix(".train_state.pt")
    tmp = state_path.with_suffix(".tmp")
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "generator": gen.get_state()}, tmp)
    os.replace(tmp, state_path)


def calibrate(checkpoint: Path, val_data: Path, device: str = "auto") -> dict[str, float]:
    """Pick each finding's flag threshold (ROC point nearest (0, 1)) on held-out data and
    store it in the checkpoint, so ``flagged`` means the same thing in every front end."""
    from .metrics import youden_nearest_threshold
    from .models.medalign_model import load_checkpoint, read_checkpoint, save_checkpoint
    from .screening import Screener

    model = load_checkpoint(checkpoint, device="cpu")
    cases = [c for c in load_cohort(val_data) if c.labels is not None or c.report]
    findings = model.training_info.get("trained_findings")
    screener = Screener(model=model, findings=findings, device=device)
    labels = resolve_labels(cases, screener.findings).numpy()
    from .io import read_volume

    probs = np.array([[f.probability for f in screener(read_volume(c.volume_path), with_maps=False).findings] for c in cases])
    thresholds = {}
    for j, name in enumerate(screener.findings):
        known = labels[:, j] >= 0
        if len(np.unique(labels[known, j])) == 2:
            thresholds[name] = round(youden_nearest_threshold(labels[known, j], probs[known, j]), 4)
    _, _, extra = read_checkpoint(checkpoint)
    extra["thresholds"] = thresholds
    extra["threshold_data"] = str(val_data)
    model.training_info = extra
    save_checkpoint(model, checkpoint, extra=extra)
    return thresholds
