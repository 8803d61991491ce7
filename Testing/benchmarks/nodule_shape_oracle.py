"""How far does a hand-made nodule detector get on the phantoms, at their own spacing?

A reference point for the demo model's lung-nodule score, which stays near chance: if a
classical detector that knows nothing but shape separates phantoms with and without
nodules, the information is in the images and the model fails to learn it; if it does not,
the phantoms' nodules are not a shape decision a model could make either.

The detector is the textbook one: a lung mask (air closed and filled), a grey opening of
the lung's HU with a ball of ``--radius-mm`` (erases vessels and other bright structures
thinner than the ball, keeps compact ones at their HU), candidates = the opened voxels
above ``--solid-hu``, and each candidate scored by how much of its rim is aerated lung,
how round it is and how big.  A phantom's score is its best candidate's.  No labels are
used except to measure.

    medalign phantoms --out work/val --n 100 --seed 2
    python Testing/benchmarks/nodule_shape_oracle.py --data work/val

Measured for the model card (generator 1.1, 2-core CPU, under a second per phantom): on the
150 test phantoms, radius 4 mm, case AUC 0.77 (the demo model's lung-nodule score: 0.53),
the best candidate on a nodule in 51% of the phantoms with one; on the 100 validation
phantoms 0.76, and 0.67 with a 2.5 mm ball.  See the card's section "Where the small
findings' case decision is lost".
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from medalign.core.volume_io import read_volume
from medalign.data.cohorts import load_cohort
from medalign.data.labels import resolve_labels
from medalign.knowledge.findings import CT_RATE_FINDINGS

NODULE_BIT = 1 << CT_RATE_FINDINGS.index("Lung nodule")


def lung_mask(hu: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Aerated lung, closed over vessels and lesions (10 mm) and filled, one voxel off the wall."""
    air = (hu > -990) & (hu < -500)
    lung = ndimage.binary_closing(air, iterations=max(1, int(round(10.0 / spacing.min()))))
    return ndimage.binary_erosion(ndimage.binary_fill_holes(lung), iterations=1)


def ball(radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    half = np.ceil(radius_mm / spacing).astype(int)
    grid = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing)], indexing="ij")
    return sum(g * g for g in grid) <= radius_mm**2 + 1e-6


def best_candidate(hu: np.ndarray, spacing: np.ndarray, radius_mm: float, solid_hu: float,
                   min_air: float) -> tuple[float, tuple[slice, ...] | None, np.ndarray | None]:
    """(score, bounding slices, voxel mask) of the phantom's most nodule-like candidate."""
    lung = lung_mask(hu, spacing)
    opened = ndimage.grey_opening(np.where(lung, np.clip(hu, -1000, 100), -1000), footprint=ball(radius_mm, spacing))
    labels, _ = ndimage.label((opened > solid_hu) & lung)
    voxel_mm3 = float(np.prod(spacing))
    best: tuple[float, tuple[slice, ...] | None, np.ndarray | None] = (0.0, None, None)
    for index, box in enumerate(ndimage.find_objects(labels), 1):
        inside = labels[box] == index
        volume_mm3 = inside.sum() * voxel_mm3
        if not 4 / 3 * np.pi * 3**3 <= volume_mm3 <= 4 / 3 * np.pi * 20**3:  # 6 to 40 mm across
            continue
        wide = tuple(slice(max(b.start - 3, 0), b.stop + 3) for b in box)
        component = labels[wide] == index
        rim = ndimage.binary_dilation(component, iterations=2) & ~component
        air = float((hu[wide][rim] < -600).mean())  # a nodule sits in aerated lung
        if air <= min_air:
            continue
        points = np.argwhere(inside) * spacing
        reach = np.sqrt(((points - points.mean(0)) ** 2).sum(1)).max() + spacing.mean() / 2
        roundness = volume_mm3 / (4 / 3 * np.pi * reach**3)
        score = air * roundness * volume_mm3 ** (1 / 3)
        if score > best[0]:
            best = (score, box, inside)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a phantom cohort with masks")
    ap.add_argument("--radius-mm", type=float, default=4.0, help="opening ball: thinner structures are erased")
    ap.add_argument("--solid-hu", type=float, default=-450.0, help="opened HU above this is a candidate")
    ap.add_argument("--min-air", type=float, default=0.5, help="share of a candidate's rim that must be lung")
    ap.add_argument("--cases", type=int, default=None, help="the first N cases")
    args = ap.parse_args()
    cases = load_cohort(args.data)[: args.cases]
    labels = resolve_labels(cases, ["Lung nodule"]).numpy()[:, 0]
    scores, winners = [], []
    for case in cases:
        volume = read_volume(case.volume_path)
        spacing = np.asarray(volume.spacing, dtype=float)[::-1]  # the array is (k, j, i)
        hu = np.asarray(volume.array, dtype=np.float32)
        score, box, inside = best_candidate(hu, spacing, args.radius_mm, args.solid_hu, args.min_air)
        bits = 0
        if box is not None and case.mask_path is not None:
            bits = int(np.bitwise_or.reduce(read_volume(case.mask_path).array[box][inside].astype(np.int64)))
        scores.append(score)
        winners.append(bits)
    positives = labels == 1
    on_nodule = np.mean([(w & NODULE_BIT) != 0 for w, p in zip(winners, positives) if p])
    print(f"lung nodule, opening radius {args.radius_mm:g} mm, {len(cases)} phantoms ({int(positives.sum())} with nodules)")
    print(f"  case AUC (best candidate's score): {roc_auc_score(labels, scores):.3f}")
    print(f"  best candidate on a nodule in {100 * on_nodule:.0f}% of the phantoms with one")
    others = Counter(CT_RATE_FINDINGS[b] if b >= 0 else "normal anatomy"
                     for w, p in zip(winners, positives) if not p
                     for b in ([i for i in range(len(CT_RATE_FINDINGS)) if (w >> i) & 1] or [-1]))
    print("  where it sits in phantoms without a nodule: " + ", ".join(f"{k} {n}" for k, n in others.most_common()))


if __name__ == "__main__":
    main()
