"""Training: image-report contrastive learning with BrgSA's bank losses, plus finding
prompts, on any cohort of CT volumes with reports (phantoms or a researcher's own).

Losses per batch (all on L2-normalised joint-space latents, see ``training.losses``):
* finding prompts: for every finding with a label, a random training wording of
  "present" and of "absent" is scored against the image; cross-entropy over the pair
  teaches the zero-shot decision rule the screener uses;
* dense token-text loss where lesion masks exist (``local_alignment_loss``);
* image-report InfoNCE (CLIP) on the global latent, and the same on the bank-bridged
  latents (temperature 1/10, BrgSA's temp3);
* bank reconstruction MSE (weight 0.5), BrgSA's knowledge-bank loss.
The text encoder is frozen, so every sentence is embedded once and cached; its projection
into the joint space is fitted on the finding sentences alone first, then frozen
(``training.text_anchors``).
Single process, or several through ``torchrun`` (``training.distributed``).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medalign.core.errors import InputError
from medalign.core.parallel import default_workers
from medalign.data.cohorts import Case, load_cohort
from medalign.data.labels import resolve_labels
from medalign.models.base import ImageFeatures
from medalign.models.medalign_model import MedAlignModel, build_text_encoder
from medalign.training import checkpoint, distributed
from medalign.training.config import TrainConfig, check_precision
from medalign.training.losses import clip_loss, lesion_prior, local_alignment_loss
from medalign.training.prepared import PreparedCohort, augment
from medalign.training.sentences import finding_sentences, report_sentences
from medalign.training.text_anchors import warm_up_text_projection


def train(cfg: TrainConfig, progress: bool = True, log=print) -> Path:
    """Train (or resume) a MedAlign model; returns the checkpoint path."""
    from tqdm import tqdm

    from medalign.core.device import autocast, configure_cpu_threads, resolve_device
    from medalign.knowledge.findings import CT_RATE_FINDINGS

    configure_cpu_threads()
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device)
    world, rank, device = distributed.setup_distributed(device)
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + rank)

    cases = load_cohort(cfg.data, require_reports=True)
    findings, labels = _learnable_findings(cfg, cases)
    model = _new_model(cfg, log)
    model.to(device)
    # NDHWC convolutions: measured 1.25 -> 0.93 s per forward+backward of a batch of 8 on 2 CPU cores
    layout = torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format
    model.to(memory_format=layout)
    text_encoder = build_text_encoder(None, cfg.model_config)
    stride = model.patch_size[0]
    workers = cfg.workers if cfg.workers is not None else max(1, default_workers() // world)
    cohort = PreparedCohort(cases, cfg.model_config.profile, stride, cfg.cache, progress and rank == 0, workers)
    finding_bits = torch.tensor([CT_RATE_FINDINGS.index(f) if f in CT_RATE_FINDINGS else -1 for f in findings])
    prior = lesion_prior(cohort.token_masks, finding_bits) if cfg.prior_negatives else None
    pos_raw, neg_raw, report_raw = _embed_texts(text_encoder, findings, cases, device)

    resume_state = checkpoint.resume_state(cfg)  # read once: decides the warm-up and restores the optimizer
    if resume_state is None and cfg.init is None:
        text_loss = warm_up_text_projection(model, pos_raw, neg_raw, decorrelate=cfg.decorrelate)
        log(f"text anchors separated (supervised contrastive loss {text_loss:.3f}); projection frozen")
    else:
        model.text_proj.requires_grad_(False)
    params, opt, sched = _optimizer(model, cfg)
    start_step = 0
    if resume_state is not None:
        start_step = checkpoint.restore(model, opt, sched, gen, cfg.out, resume_state)
        log(f"resumed from step {start_step}")

    net = distributed.wrap(model, device, world)
    indices = list(range(rank, len(cohort), world))  # each rank sees its shard
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="training",
               disable=not (progress and rank == 0))
    model.train()
    history: list[float] = []
    t0 = time.time()
    for step in bar:
        pick = torch.randint(0, len(indices), (cfg.batch_size,), generator=gen)
        idx = [indices[int(i)] for i in pick]
        x, token_masks = augment([cohort.images[i] for i in idx], [cohort.token_masks[i] for i in idx], stride, gen, device)
        x = x.contiguous(memory_format=layout)
        y = labels[idx].to(device)  # (B, F)
        with autocast(device, cfg.precision):
            g, tokens = net(x)
            feats = ImageFeatures(global_latent=g, tokens=tokens)
            loss, loss_find = _batch_loss(model, cfg, feats, y, token_masks, finding_bits, prior,
                                          pos_raw, neg_raw, report_raw[idx], gen)
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
            checkpoint.save(model, opt, sched, gen, step + 1, cfg, findings, history, time.time() - t0)
    bar.close()
    distributed.barrier(world)
    return cfg.out


def _learnable_findings(cfg: TrainConfig, cases: list[Case]) -> tuple[list[str], torch.Tensor]:
    """The findings to train (asked for, else those the cohort labels, else all 18) that
    have both positive and negative cases, and their (N, F) labels (-1 = unknown)."""
    from medalign.knowledge.findings import CT_RATE_FINDINGS

    findings = cfg.findings or [f for f in CT_RATE_FINDINGS if any(c.labels and f in c.labels for c in cases)] or list(CT_RATE_FINDINGS)
    labels = resolve_labels(cases, findings)
    keep = [j for j in range(len(findings)) if (labels[:, j] == 1).any() and (labels[:, j] == 0).any()]
    if not keep:
        raise InputError(f"No finding in {cfg.data} has both positive and negative cases; nothing to learn from.")
    return [findings[j] for j in keep], labels[:, keep]


def _new_model(cfg: TrainConfig, log) -> MedAlignModel:
    """A fresh model, or one holding ``cfg.init``'s weights; a resumed run's checkpoint and
    an init file are both checked against the configuration before minutes of preprocessing."""
    model = MedAlignModel(cfg.model_config)
    if checkpoint.is_resumable(cfg):
        checkpoint.require_config(model, cfg.out, "continue it with its own configuration, or start over with "
                                  "--no-resume or another --out")
    elif cfg.init is not None:
        checkpoint.load_init(model, cfg.init)
        log(f"starting from the weights of {cfg.init} (text projection kept frozen)")
    return model


def _embed_texts(text_encoder, findings: list[str], cases: list[Case], device: torch.device
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Frozen-encoder embeddings, computed once: each finding's positive and negative
    training sentences, and each case's report (mean over its sentences)."""
    pos_raw, neg_raw = [], []
    for f in findings:
        p, n = finding_sentences(f)
        pos_raw.append(text_encoder.embed(p))
        neg_raw.append(text_encoder.embed(n))
    report_raw = torch.stack([text_encoder.embed(report_sentences(c.report or "")).mean(0) for c in cases])
    return [t.to(device) for t in pos_raw], [t.to(device) for t in neg_raw], report_raw.to(device)


def _optimizer(model: MedAlignModel, cfg: TrainConfig):
    """AdamW over the trainable parameters (no decay on biases and norms) with a linear
    warm-up into a cosine decay; returns (parameters, optimizer, scheduler)."""
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))
    )
    return params, opt, sched


def _batch_loss(model: MedAlignModel, cfg: TrainConfig, feats: ImageFeatures, y: torch.Tensor, token_masks: list,
                finding_bits: torch.Tensor, prior: torch.Tensor | None, pos_raw: list[torch.Tensor],
                neg_raw: list[torch.Tensor], reports: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted loss of one batch, and its finding-prompt part (for the progress bar)."""
    n_f = len(pos_raw)
    # finding prompts: one random wording per side and finding for this step
    pi = [int(torch.randint(0, len(t), (1,), generator=gen)) for t in pos_raw]
    ni = [int(torch.randint(0, len(t), (1,), generator=gen)) for t in neg_raw]
    t_pos = model.project_text(torch.stack([pos_raw[j][pi[j]] for j in range(n_f)]))
    t_neg = model.project_text(torch.stack([neg_raw[j][ni[j]] for j in range(n_f)]))
    logits = model.logits(feats, torch.cat([t_pos, t_neg]))  # (B, 2F)
    pair = torch.stack([logits[:, :n_f], logits[:, n_f:]], dim=-1)  # (B, F, 2)
    known = y >= 0
    target = (1 - y).clamp(0, 1)  # class 0 = present, class 1 = absent
    loss_find = F.cross_entropy(pair[known], target[known]) if known.any() else logits.sum() * 0
    loss_local = local_alignment_loss(model, feats, t_pos, t_neg, token_masks, finding_bits, y, prior)

    # image-report contrastive + BrgSA bank losses
    v = F.normalize(feats.global_latent, dim=-1)
    r = model.project_text(reports)
    v_hat, r_hat = model.bank(v), model.bank(r)
    loss_clip = clip_loss(v, r, model.log_scale.exp()) + clip_loss(F.normalize(v_hat, dim=-1), F.normalize(r_hat, dim=-1), 10.0)
    loss_mse = F.mse_loss(v_hat, v) + F.mse_loss(r_hat, r)
    loss = loss_find + cfg.local_weight * loss_local + cfg.clip_weight * loss_clip + cfg.mse_weight * loss_mse
    return loss, loss_find
