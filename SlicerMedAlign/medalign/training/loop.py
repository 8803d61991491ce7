"""Training: image-report contrastive learning with BrgSA's bank losses, plus finding
prompts, on any cohort of CT volumes with reports (phantoms or a researcher's own).

Losses per batch (all on L2-normalised joint-space latents):
* finding prompts: for every finding with a label, a random training wording of
  "present" and of "absent" is scored against the image; cross-entropy over the pair
  teaches the zero-shot decision rule the screener uses;
* image-report InfoNCE (CLIP) on the global latent, and the same on the bank-bridged
  latents (temperature 1/10, BrgSA's temp3);
* bank reconstruction MSE (weight 0.5), BrgSA's knowledge-bank loss.
The text encoder is frozen, so every sentence is embedded once and cached; its projection
into the joint space is fitted on the finding sentences alone first, then frozen
(``warm_up_text_projection``).
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

from medalign.core.atomic import atomic_output
from medalign.core.errors import InputError
from medalign.core.parallel import default_workers
from medalign.data.cohorts import Case, load_cohort
from medalign.models.base import ImageFeatures
from medalign.models.medalign_model import MedAlignConfig, MedAlignModel, build_text_encoder, save_checkpoint

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
    clip_weight: float = 0.25
    local_weight: float = 1.0
    prior_negatives: bool = True  # weigh lesion-free tokens by where lesions usually are (lesion_prior)
    mse_weight: float = 0.5
    # weight of the warm-up penalty that makes findings' present-minus-absent text directions
    # orthogonal (see decision_directions); 0 keeps demo versions 1-4's warm-up
    decorrelate: float = 1.0
    init: Path | None = None  # start from these weights (fine-tuning) with a fresh optimizer
    val_data: Path | None = None
    resume: bool = True
    save_every: int = 200
    device: str = "auto"
    cache: Path | None = None
    findings: list[str] | None = None
    workers: int | None = 1  # preprocessing processes (None: every core, shared among torchrun ranks)
    # "bf16": forward and losses under bfloat16 autocast (weights, optimizer and checkpoint stay
    # float32); faster on recent GPUs, no loss scaling needed
    precision: str = "float32"
    model_config: MedAlignConfig = field(default_factory=MedAlignConfig)


def finding_sentences(finding: str, kb=None) -> tuple[list[str], list[str]]:
    """Training positives/negatives: TRAIN_TEMPLATES filled with the name and its synonyms."""
    from medalign.knowledge.findings import find

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
    """Cases preprocessed once to the model grid (float16 on CPU), cached on disk if asked.

    Where a case has a lesion mask, its bits are also brought onto the model's local-token
    grid (a token carries bit f when any of its 2x2x2 sub-samples lies in lesion f), for
    the dense token-text loss.
    """

    def __init__(self, cases: list[Case], profile, token_stride: int, cache: Path | None, progress: bool,
                 workers: int | None = 1) -> None:
        from tqdm import tqdm

        from medalign.core.parallel import ordered_map

        self.cases = cases
        self.images: list[torch.Tensor] = []
        self.token_masks: list[torch.Tensor | None] = []
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
        key = cache_key(profile, token_stride)
        jobs = [(case, profile, token_stride, cache / f"{case.case_id}.{key}.pt" if cache is not None else None)
                for case in cases]
        for item in tqdm(ordered_map(_prepared_item, jobs, workers), total=len(jobs), desc="preprocessing",
                         disable=not progress, unit="ct"):
            self.images.append(item["image"])
            self.token_masks.append(item.get("tokens"))

    def __len__(self) -> int:
        return len(self.cases)


# Bump when token_mask's meaning changes, so caches made by older code are not reused.
TOKEN_MASK_VERSION = 2


def cache_key(profile, stride: int) -> str:
    """Cache file tag: changes whenever the profile, the token stride or the mask rule does."""
    import hashlib
    import json

    blob = json.dumps([profile.to_dict(), int(stride), TOKEN_MASK_VERSION], sort_keys=True)
    return f"{profile.name}.{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def _prepared_item(job: tuple) -> dict[str, torch.Tensor]:
    """One case on the model grid (float16) plus its token mask; read from or written to the cache."""
    from medalign.core.volume_io import read_volume
    from medalign.inference.preprocess import prepare

    case, profile, stride, cached = job
    if cached is not None and cached.is_file():
        return torch.load(cached, weights_only=True)
    prepared = prepare(read_volume(case.volume_path), profile)
    item = {"image": prepared.tensor[0].to(torch.float16).contiguous()}
    if case.mask_path is not None:
        item["tokens"] = token_mask(read_volume(case.mask_path), prepared.grid_to_ras, profile.size, stride)
    if cached is not None:  # a unique temp name: torchrun ranks and workers may race on a case
        with atomic_output(cached) as tmp:
            torch.save(item, tmp)
    return item


def token_mask(mask, grid_to_ras: np.ndarray, size: tuple[int, int, int], stride: int) -> torch.Tensor:
    """(X', Y', Z') int32 bitmask of a lesion mask on the local-token grid of a model grid.

    Every lesion voxel is carried to the token it falls in, so a 2 mm calcification marks
    its 16 mm token (point sampling at token resolution would miss most of them)."""
    grid = np.array([n // stride for n in size])
    values = mask.array
    k, j, i = np.nonzero(values)
    out = np.zeros(int(np.prod(grid)), dtype=np.int64)
    if len(k) == 0:
        return torch.from_numpy(out.reshape(*grid).astype(np.int32))
    bits = values[k, j, i].astype(np.int64)
    ras = mask.ijk_to_ras_points(np.stack([i, j, k], axis=1))
    to_grid = np.linalg.inv(grid_to_ras)
    xyz = ras @ to_grid[:3, :3].T + to_grid[:3, 3]
    # model voxel n spans [n - 0.5, n + 0.5); token a holds voxels a*stride .. (a+1)*stride - 1
    tok = np.floor((xyz + 0.5) / stride).astype(np.int64)
    inside = np.all((tok >= 0) & (tok < grid), axis=1)
    lin = np.ravel_multi_index(tuple(tok[inside].T), tuple(grid))
    bits = bits[inside]
    for bit in range(int(bits.max()).bit_length() if len(bits) else 0):
        hit = ((bits >> bit) & 1).astype(bool)
        if hit.any():
            out[np.bincount(lin[hit], minlength=len(out)) > 0] |= 1 << bit
    return torch.from_numpy(out.reshape(*grid).astype(np.int32))


def _augment(images: list[torch.Tensor], tokens: list[torch.Tensor | None], stride: int, gen: torch.Generator,
             device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Cheap, label-preserving jitter of a batch, on ``device``: a shift by whole tokens (so
    token masks shift with the image) and a small intensity change.  Every random choice
    comes from ``gen`` (the noise through a seed drawn from it), so runs are reproducible
    and resumable on any device."""
    out, shifted = [], []
    for x, t in zip(images, tokens):
        steps = [int(v) for v in torch.randint(-1, 2, (3,), generator=gen)]
        scale = 1.0 + 0.05 * (torch.rand(1, generator=gen).item() - 0.5)
        out.append(torch.roll(x.to(device).float(), shifts=[s * stride for s in steps], dims=(-3, -2, -1)) * scale)
        shifted.append(torch.roll(t, shifts=steps, dims=(-3, -2, -1)) if t is not None else None)
    x = torch.stack(out)
    noise_gen = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    return x.add_(torch.randn(x.shape, generator=noise_gen, device=device), alpha=0.02), shifted


def resolve_labels(cases: list[Case], findings: list[str]) -> torch.Tensor:
    """(N, F) labels: labels.csv where present, else read from the report; -1 = unknown."""
    from medalign.data.report_labeller import label_report

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
def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss: sentences of one class together, other classes apart."""
    sim = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    same = (labels[:, None] == labels[None, :]) & ~self_mask
    return -(log_prob.masked_fill(~same, 0).sum(1) / same.sum(1).clamp_min(1)).mean()


def decision_directions(z: torch.Tensor, y: torch.Tensor, n_f: int) -> torch.Tensor:
    """(F, E) unit "present minus absent" direction of each finding: the difference of the
    normalised class means of its projected positive (class f) and negative (class F + f)
    sentences.  The image-level margin of finding f is the image latent's dot product with
    it, so two findings with parallel directions cannot be scored independently."""
    means = torch.zeros(2 * n_f, z.shape[1], device=z.device).index_add_(0, y, z)
    means = F.normalize(means / torch.bincount(y, minlength=2 * n_f).clamp_min(1)[:, None], dim=-1)
    return F.normalize(means[:n_f] - means[n_f:], dim=-1)


def direction_overlap(d: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine between different findings' decision directions (0: orthogonal)."""
    c = d @ d.T
    off = ~torch.eye(len(d), dtype=torch.bool, device=d.device)
    return c[off].pow(2).mean() if off.any() else c.sum() * 0


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


def _token_targets(model, feats, t_pos: torch.Tensor, t_neg: torch.Tensor, token_masks: list,
                   finding_bits: torch.Tensor, y: torch.Tensor):
    """Per-token "present minus absent" logit margins of the cases that have a lesion mask,
    with which tokens lie in each finding's lesion and which findings are labelled.
    Shapes (b, F, X', Y', Z'); None when no case of the batch has a mask."""
    have = [i for i, m in enumerate(token_masks) if m is not None]
    if not have:
        return None
    sub = ImageFeatures(feats.global_latent[have], feats.tokens[have])
    n_f = len(t_pos)
    tl = model.token_logits(sub, torch.cat([t_pos, t_neg]))  # (b, 2F, X', Y', Z')
    margin = tl[:, :n_f] - tl[:, n_f:]
    masks = torch.stack([token_masks[i] for i in have]).to(tl.device).long()  # (b, X', Y', Z')
    bits = finding_bits.to(tl.device).clamp_min(0)
    inside = ((masks[:, None] >> bits[None, :, None, None, None]) & 1).bool()
    labelled = (y[have] >= 0)[:, :, None, None, None] & (finding_bits >= 0).to(tl.device)[None, :, None, None, None]
    return margin, inside & labelled, ~inside & labelled


def _per_finding_mean(loss: torch.Tensor, sel: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Mean of ``loss`` weighted by ``sel`` (a mask or weights) within each finding (dim 1),
    then over the findings that have any weight."""
    count = sel.sum(dim=dims)
    total = (loss * sel).sum(dim=dims)
    have_any = count > 0
    return (total[have_any] / count[have_any]).mean() if have_any.any() else loss.sum() * 0


def lesion_prior(token_masks: list, finding_bits: torch.Tensor) -> torch.Tensor | None:
    """(F, X', Y', Z') how often each token holds lesion f across the cohort, widened by one
    token (the augmentation shifts by up to one): where a finding is found when it is
    present.  None when no case has a mask."""
    masks = [m for m in token_masks if m is not None]
    if not masks:
        return None
    bits = finding_bits.clamp_min(0)
    freq = torch.zeros(len(bits), *masks[0].shape)
    for m in masks:
        freq += ((m.long()[None] >> bits[:, None, None, None]) & 1).float()
    freq = F.max_pool3d(freq[None], kernel_size=3, stride=1, padding=1)[0] / len(masks)
    return freq * (finding_bits >= 0).float()[:, None, None, None]


def local_alignment_loss(model, feats, t_pos: torch.Tensor, t_neg: torch.Tensor, token_masks: list,
                         finding_bits: torch.Tensor, y: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
    """Dense token-text loss where lesion masks exist: tokens inside lesion f choose the
    "f present" prompt over "f absent"; every other token of a labelled finding chooses
    "absent".  Each finding's positive and negative tokens are averaged separately, then
    over findings: a 2 mm calcification's one token weighs as much as an effusion's
    hundreds.  Cases without a mask contribute nothing, so cohorts of CTs + reports train
    as before.

    With ``prior`` (see ``lesion_prior``) half of the negative term is weighted by it:
    lesion-free tokens where lesions usually sit (the aortic wall for calcification) then
    weigh as much as the lesion tokens.  Without it a uniform average over all lesion-free
    tokens is met by a location prior: measured on the v2 demo model, token AUC within
    positive cases 0.98 but case AUC 0.52-0.58 for both calcifications."""
    targets = _token_targets(model, feats, t_pos, t_neg, token_masks, finding_bits, y)
    if targets is None:
        return feats.global_latent.sum() * 0
    margin, pos, neg = targets
    dims = (0, 2, 3, 4)
    # two-way cross-entropy over (present, absent) == softplus of the signed margin
    absent_loss = F.softplus(margin)
    dense_neg = _per_finding_mean(absent_loss, neg, dims)
    if prior is not None:
        w = prior.to(margin.device)[None] * neg
        dense_neg = (dense_neg + _per_finding_mean(absent_loss, w, dims)) / 2
    if not pos.any():
        return dense_neg
    return (_per_finding_mean(F.softplus(-margin), pos, dims) + dense_neg) / 2


def clip_loss(a: torch.Tensor, b: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    logits = scale * a @ b.T
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def train(cfg: TrainConfig, progress: bool = True, log=print) -> Path:
    """Train (or resume) a MedAlign model; returns the checkpoint path."""
    from tqdm import tqdm

    from medalign.core.device import autocast, configure_cpu_threads, resolve_device
    from medalign.knowledge.findings import CT_RATE_FINDINGS

    configure_cpu_threads()
    device = resolve_device(cfg.device)
    _check_precision(cfg.precision, device)
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

    model = MedAlignModel(cfg.model_config)
    # both checked before minutes of preprocessing
    if is_resumable(cfg):
        _require_config(model, cfg.out, "continue it with its own configuration, or start over with "
                        "--no-resume or another --out")
    elif cfg.init is not None:
        _load_init(model, cfg.init)
        log(f"starting from the weights of {cfg.init} (text projection kept frozen)")
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

    resume_state = _resume_state(cfg)  # read once: decides the warm-up and restores the optimizer
    if resume_state is None and cfg.init is None:
        text_loss = warm_up_text_projection(model, pos_raw, neg_raw, decorrelate=cfg.decorrelate)
        log(f"text anchors separated (supervised contrastive loss {text_loss:.3f}); projection frozen")
    else:
        model.text_proj.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))
    )
    start_step = 0
    if resume_state is not None:
        from medalign.models.medalign_model import load_state_strict, read_checkpoint

        _, tensors, _ = read_checkpoint(cfg.out)
        load_state_strict(model, tensors, cfg.out.name)
        state = resume_state
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
        x, token_masks = _augment([cohort.images[i] for i in idx], [cohort.token_masks[i] for i in idx], stride, gen, device)
        x = x.contiguous(memory_format=layout)
        y = labels[idx].to(device)  # (B, F)
        with autocast(device, cfg.precision):
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
            loss_local = local_alignment_loss(model, feats, t_pos, t_neg, token_masks, finding_bits, y, prior)

            # image-report contrastive + BrgSA bank losses
            v = F.normalize(feats.global_latent, dim=-1)
            r = model.project_text(report_raw[idx])
            v_hat, r_hat = model.bank(v), model.bank(r)
            loss_clip = clip_loss(v, r, model.log_scale.exp()) + clip_loss(F.normalize(v_hat, dim=-1), F.normalize(r_hat, dim=-1), 10.0)
            loss_mse = F.mse_loss(v_hat, v) + F.mse_loss(r_hat, r)
            loss = loss_find + cfg.local_weight * loss_local + cfg.clip_weight * loss_clip + cfg.mse_weight * loss_mse

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


def _check_precision(precision: str, device: torch.device) -> None:
    """Training runs in float32 or bf16; fp16 would need loss scaling, which is not worth it here."""
    from medalign.core.device import resolve_precision

    if precision == "auto" or resolve_precision(device, precision) == torch.float16:
        raise InputError(f"Training precision must be float32 or bf16, not {precision!r}.")


def is_resumable(cfg: TrainConfig) -> bool:
    """True when ``cfg.out`` and its optimizer state exist and resuming is allowed."""
    return cfg.resume and cfg.out.with_suffix(".train_state.pt").is_file() and cfg.out.is_file()


def _resume_state(cfg: TrainConfig) -> dict | None:
    """The saved optimizer/scheduler/step state when this run continues an earlier one."""
    return torch.load(cfg.out.with_suffix(".train_state.pt"), weights_only=True) if is_resumable(cfg) else None


def _load_init(model: MedAlignModel, path: Path) -> None:
    """Fine-tuning start: another run's weights, text projection included (so it stays frozen
    and the text warm-up is skipped); the model configuration must be the same."""
    from medalign.models.medalign_model import load_state_strict, read_checkpoint

    _require_config(model, path, "it cannot start this run")
    load_state_strict(model, read_checkpoint(path)[1], path.name)


def _require_config(model: MedAlignModel, path: Path, consequence: str) -> None:
    """Refuse, from the file's header alone, a checkpoint trained with another configuration."""
    from medalign.models.medalign_model import read_checkpoint

    if read_checkpoint(path, tensors=False)[0].to_json() != model.cfg.to_json():
        raise InputError(f"{path} was trained with another model configuration; {consequence}.")


def _save(model, opt, sched, gen, step: int, cfg: TrainConfig, findings: list[str], history: list[float], seconds: float) -> None:
    extra = {
        "trained_findings": findings,
        "steps": step,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "decorrelate": cfg.decorrelate,
        "precision": cfg.precision,
        "init": str(cfg.init) if cfg.init is not None else None,
        "data": str(cfg.data),
        "initial_loss": float(np.mean(history[:20])) if history else None,
        "final_loss": float(np.mean(history[-20:])) if history else None,
        "train_seconds": round(seconds, 1),
    }
    save_checkpoint(model, cfg.out, extra=extra)
    state_path = cfg.out.with_suffix(".train_state.pt")
    with atomic_output(state_path) as tmp:
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                    "generator": gen.get_state()}, tmp)


def calibrate(checkpoint: Path, val_data: Path, device: str = "auto") -> dict[str, dict[str, float]]:
    """Pick each finding's flag threshold (ROC point nearest (0, 1)) on held-out data and
    store it in the checkpoint with the finding's held-out AUC, so ``flagged`` means the same
    thing in every front end and findings the model cannot tell apart are never flagged.
    Returns {finding: {"threshold": t, "auc": a}}."""
    from medalign.core.volume_io import read_volume
    from medalign.evaluation.metrics import point_metrics
    from medalign.inference.screener import Screener
    from medalign.models.medalign_model import load_checkpoint, read_checkpoint, save_checkpoint

    model = load_checkpoint(checkpoint, device="cpu")
    cases = [c for c in load_cohort(val_data) if c.labels is not None or c.report]
    findings = model.training_info.get("trained_findings")
    screener = Screener(model=model, findings=findings, device=device)
    labels = resolve_labels(cases, screener.findings).numpy()
    probs = np.array([[f.probability for f in screener(read_volume(c.volume_path), with_maps=False).findings] for c in cases])
    calibration = {}
    for j, name in enumerate(screener.findings):
        known = labels[:, j] >= 0
        if len(np.unique(labels[known, j])) == 2:
            m = point_metrics(labels[known, j], probs[known, j])
            calibration[name] = {"threshold": round(m["threshold"], 4), "auc": round(m["auc"], 4)}
    _, _, extra = read_checkpoint(checkpoint)
    extra["thresholds"] = {k: v["threshold"] for k, v in calibration.items()}
    extra["validation_auc"] = {k: v["auc"] for k, v in calibration.items()}
    extra["threshold_data"] = str(val_data)
    model.training_info = extra
    save_checkpoint(model, checkpoint, extra=extra)
    return calibration
