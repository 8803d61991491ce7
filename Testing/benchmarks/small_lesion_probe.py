"""Is the demo input grid fine enough for a small finding?  Prints token- and case-level AUCs.

A small CNN shaped like the demo model's stem (two stride-2 convolutions, so one output per
16 mm local token) is trained on patches of the model's own input: tokens holding the
finding's lesion against tokens of the same tissue (token mean HU within --tissue-hu).
Then it scores every such token of held-out phantoms and takes the maximum, which is how
the screening model decides a case.  Token AUC high but case AUC near 0.5 means the grid
gives a token score that is not specific enough for a maximum over thousands of tokens.

    medalign phantoms --out work/train --n 600 --seed 1
    python Testing/benchmarks/small_lesion_probe.py --data work/train --cache work/cache --finding "Lung nodule"

Measured for the model card (600 generator-1.1 phantoms, last 100 held out, 2-core CPU):
lung nodule, tissue -1000..-300 HU: token AUC 0.94, case AUC 0.60; lymphadenopathy,
--tissue-hu -200 150: token AUC 0.94, case AUC 0.48.  First 160 cases, 50 held out: lung nodule
on 4 4 5 mm token AUC 0.95, case AUC 0.44; with --grid-mm 2 2 2.5 token AUC 0.96, case AUC 0.41.
The case AUC moves by a few hundredths between runs: training stops after --seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from medalign.datasets import load_cohort
from medalign.knowledge import CT_RATE_FINDINGS
from medalign.profiles import DEMO
from medalign.train import PreparedCohort, resolve_labels

STRIDE = 4  # model voxels per local token along each axis
CONTEXT_MM = 24.0  # patch half-width: at 4 mm, the token and one token of context on each side


def stem_probe() -> nn.Sequential:
    """Two stride-2 convolutions and a 1x1 read-out: one score per token (STRIDE voxels)."""
    return nn.Sequential(
        nn.Conv3d(DEMO.n_channels, 16, 4, stride=2, padding=1), nn.GroupNorm(8, 16), nn.GELU(),
        nn.Conv3d(16, 32, 4, stride=2, padding=1), nn.GroupNorm(8, 32), nn.GELU(),
        nn.Conv3d(32, 1, 1),
    )


def tissue_tokens(image: torch.Tensor, tissue_hu: tuple[float, float]) -> torch.Tensor:
    """(X', Y', Z') tokens whose mean HU (channel 0) lies in ``tissue_hu``, widened by two
    tokens so a lesion's own denser tokens stay candidates."""
    cell = nn.functional.avg_pool3d(image[None, :1] * 1000.0, STRIDE)[0, 0]
    inside = ((cell > tissue_hu[0]) & (cell < tissue_hu[1])).float()
    return nn.functional.max_pool3d(inside[None, None], 5, 1, 2)[0, 0] > 0


def patches(cohort, cases: range, bit: int, tissue_hu, rng, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for i in cases:
        image = cohort.images[i].float()
        lesion = torch.from_numpy(((cohort.token_masks[i].numpy() >> bit) & 1).astype(bool))
        candidates = tissue_tokens(image, tissue_hu) & ~lesion
        padded = nn.functional.pad(image, (half,) * 6, value=-1.0)
        for label, tokens, k in ((1, lesion.nonzero().numpy(), 3), (0, candidates.nonzero().numpy(), 6)):
            for t in tokens[rng.choice(len(tokens), min(k, len(tokens)), replace=False)] if len(tokens) else []:
                c = t * STRIDE + STRIDE // 2 + half
                xs.append(padded[:, c[0] - half : c[0] + half, c[1] - half : c[1] + half, c[2] - half : c[2] + half])
                ys.append(label)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a phantom cohort with masks")
    ap.add_argument("--cache", type=Path, default=None, help="the training cache (medalign train --cache)")
    ap.add_argument("--finding", default="Lung nodule")
    ap.add_argument("--tissue-hu", type=float, nargs=2, default=(-1000.0, -300.0))
    ap.add_argument("--held-out", type=int, default=100, help="last N cases, never trained on")
    ap.add_argument("--seconds", type=float, default=60.0, help="training time on patches")
    ap.add_argument("--grid-mm", type=float, nargs=3, default=None,
                    help="resample to this grid instead of the demo model's 4 4 5 mm (same field of view)")
    ap.add_argument("--cases", type=int, default=None, help="use the first N cases (a fine grid needs memory)")
    args = ap.parse_args()
    profile = DEMO
    if args.grid_mm is not None:
        grid = tuple(args.grid_mm)
        size = tuple(int(round(n * s / g)) // STRIDE * STRIDE for n, s, g in zip(DEMO.size, DEMO.spacing, grid))
        profile = dataclasses.replace(DEMO, name="probe-" + "x".join(f"{g:g}" for g in grid), spacing=grid, size=size)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cases = load_cohort(args.data)[: args.cases]
    cohort = PreparedCohort(cases, profile, STRIDE, args.cache, progress=True, workers=None)
    bit = CT_RATE_FINDINGS.index(args.finding)
    split = len(cases) - args.held_out
    half = int(round(CONTEXT_MM / min(profile.spacing)))
    x_train, y_train = patches(cohort, range(split), bit, args.tissue_hu, rng, half)
    x_test, y_test = patches(cohort, range(split, len(cases)), bit, args.tissue_hu, rng, half)
    net = stem_probe()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:
        pick = torch.randint(0, len(x_train), (64,))
        logits = net(x_train[pick]).amax(dim=(1, 2, 3, 4))
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y_train[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    net.eval()
    with torch.no_grad():
        token_scores = torch.cat([net(x_test[i : i + 256]).amax(dim=(1, 2, 3, 4)) for i in range(0, len(x_test), 256)])
        case_scores, winners, lesion_share = [], [], []
        for i in range(split, len(cases)):
            image = cohort.images[i].float()
            score = net(image[None])[0, 0].masked_fill(~tissue_tokens(image, args.tissue_hu), float("-inf"))
            case_scores.append(float(score.max()))
            bits = cohort.token_masks[i].flatten()
            winners.append(int(bits[int(score.argmax())]))  # mask bits where the maximum sits
            lesion_share.append(float((bits[torch.isfinite(score.flatten())] != 0).float().mean()))
    labels = resolve_labels(cases, [args.finding]).numpy()[split:, 0]
    # in cases without the finding, what wins the maximum: another finding's lesion, or normal anatomy?
    negatives = [w for w, y in zip(winners, labels) if y == 0]
    chance = np.mean([share for share, y in zip(lesion_share, labels) if y == 0])
    others = Counter(CT_RATE_FINDINGS[b] for w in negatives for b in range(len(CT_RATE_FINDINGS)) if (w >> b) & 1)
    print(f"{args.finding} on a {' x '.join(f'{g:g}' for g in profile.spacing)} mm grid "
          f"(tokens of {' x '.join(f'{STRIDE * g:g}' for g in profile.spacing)} mm): {steps} steps on {len(x_train)} patches ({int(y_train.sum())} lesion tokens)")
    print(f"  token AUC (held-out lesion tokens vs tissue tokens): {roc_auc_score(y_test.numpy(), token_scores.numpy()):.3f}")
    print(f"  case AUC (maximum over each held-out case's tissue tokens): {roc_auc_score(labels, case_scores):.3f}")
    print(f"  in {len(negatives)} held-out cases without it, the maximum sits in another finding's lesion in "
          f"{sum(w != 0 for w in negatives)} ({100 * chance:.0f}% of their tissue tokens lie in one): "
          + ", ".join(f"{k} {n}" for k, n in others.most_common()))


if __name__ == "__main__":
    main()
