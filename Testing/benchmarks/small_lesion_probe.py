"""Is the demo input grid fine enough for a small finding?  Prints token- and case-level AUCs.

A small CNN shaped like the demo model's stem (two stride-2 convolutions, so one output per
16 mm local token) is trained on whole volumes of the model's own input, with the dense
loss of the screening model for one finding: tokens holding the finding's lesion against
lesion-free tokens of the same tissue (token mean HU within --tissue-hu), each group
weighed the same.  Then it scores the tokens of held-out phantoms and takes each case's
maximum, which is how the screening model decides a case.  Token AUC high but case AUC
near 0.5 means a token score good on average that is not specific enough for a maximum over
thousands of tokens.

    medalign phantoms --out work/train --n 600 --seed 1
    python Testing/benchmarks/small_lesion_probe.py --data work/train --cache work/cache --finding "Lung nodule"

Measured for the model card (600 generator-1.1 phantoms, last 100 held out, 2-core CPU,
2 minutes): lung nodule, tissue -1000..-300 HU: token AUC 0.96, case AUC 0.47, and the
maximum of 55 of 73 nodule-free cases in another finding's lesion; lymphadenopathy,
--tissue-hu -200 150: token AUC 0.95, case AUC 0.49.  First 160 cases, 50 held out: 4 4 5 mm
token AUC 0.97, case AUC 0.51; --grid-mm 2 2 2.5 (65 steps in the 2 minutes) 0.94 and 0.60.
Generator 1.2 (nodes in mediastinal fat), --cases 300 (last 100 held out): lung nodule case
AUC 0.59 (generator 1.1 on the same split: 0.51), lymphadenopathy 0.46 (0.54).
Training stops after --seconds, so figures move by a few hundredths between runs.
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

from medalign.data.cohorts import load_cohort
from medalign.data.labels import resolve_labels
from medalign.inference.preprocess import hu_to_model_value
from medalign.knowledge.findings import CT_RATE_FINDINGS
from medalign.models.profiles import DEMO
from medalign.training.prepared import PreparedCohort

STRIDE = 4  # model voxels per local token along each axis


def stem_probe() -> nn.Sequential:
    """The demo model's stem without its GroupNorm, and a 1x1 read-out: one score per token."""
    return nn.Sequential(
        nn.Conv3d(DEMO.n_channels, 16, 4, stride=2, padding=1), nn.GELU(),
        nn.Conv3d(16, 32, 4, stride=2, padding=1), nn.GELU(),
        nn.Conv3d(32, 1, 1),
    )


def tissue_tokens(image: torch.Tensor, tissue_hu: tuple[float, float]) -> torch.Tensor:
    """(X', Y', Z') tokens whose mean HU (channel 0) lies in ``tissue_hu``, widened by two
    tokens so a lesion's own denser tokens stay candidates."""
    lo, hi = (hu_to_model_value(v, DEMO) for v in tissue_hu)  # every probe grid keeps DEMO's window
    cell = nn.functional.avg_pool3d(image[None, :1], STRIDE)[0, 0]
    inside = ((cell > lo) & (cell < hi)).float()
    return nn.functional.max_pool3d(inside[None, None], 5, 1, 2)[0, 0] > 0


def token_targets(cohort, i: int, bit: int, tissue_hu) -> tuple[torch.Tensor, torch.Tensor]:
    """(lesion tokens, lesion-free tissue tokens) of case i on the token grid."""
    lesion = torch.from_numpy(((cohort.token_masks[i].numpy() >> bit) & 1).astype(bool))
    return lesion, tissue_tokens(cohort.images[i].float(), tissue_hu) & ~lesion


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a phantom cohort with masks")
    ap.add_argument("--cache", type=Path, default=None, help="the training cache (medalign train --cache)")
    ap.add_argument("--finding", default="Lung nodule")
    ap.add_argument("--tissue-hu", type=float, nargs=2, default=(-1000.0, -300.0))
    ap.add_argument("--held-out", type=int, default=100, help="last N cases, never trained on")
    ap.add_argument("--seconds", type=float, default=120.0, help="training time")
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
    net = stem_probe()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:  # whole volumes, as the screening model sees them
        pick = rng.choice(split, 4, replace=False)
        scores = net(torch.stack([cohort.images[i].float() for i in pick]))[:, 0]
        pos_loss, neg_loss = [], []
        for score, i in zip(scores, pick):
            lesion, tissue = token_targets(cohort, int(i), bit, args.tissue_hu)
            if lesion.any():
                pos_loss.append(nn.functional.softplus(-score[lesion]))
            neg_loss.append(nn.functional.softplus(score[tissue]))
        # lesion and tissue tokens weigh the same, as in the screening model's dense loss
        loss = torch.cat(neg_loss).mean() + (torch.cat(pos_loss).mean() if pos_loss else 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    net.eval()
    with torch.no_grad():
        case_scores, winners, lesion_share, token_scores, token_labels = [], [], [], [], []
        for i in range(split, len(cases)):
            image = cohort.images[i].float()
            raw = net(image[None])[0, 0]
            lesion, tissue = token_targets(cohort, i, bit, args.tissue_hu)
            token_scores += [raw[lesion], raw[tissue]]
            token_labels += [torch.ones(int(lesion.sum())), torch.zeros(int(tissue.sum()))]
            score = raw.masked_fill(~(tissue | lesion), float("-inf"))
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
          f"(tokens of {' x '.join(f'{STRIDE * g:g}' for g in profile.spacing)} mm): {steps} steps of 4 volumes")
    token_auc = roc_auc_score(torch.cat(token_labels).numpy(), torch.cat(token_scores).numpy())
    print(f"  token AUC (held-out lesion tokens vs tissue tokens): {token_auc:.3f}")
    print(f"  case AUC (maximum over each held-out case's tissue tokens): {roc_auc_score(labels, case_scores):.3f}")
    print(f"  in {len(negatives)} held-out cases without it, the maximum sits in another finding's lesion in "
          f"{sum(w != 0 for w in negatives)} ({100 * chance:.0f}% of their tissue tokens lie in one): "
          + ", ".join(f"{k} {n}" for k, n in others.most_common()))


if __name__ == "__main__":
    main()
