"""How sure a screening result is: a predictive ensemble over prompt wordings and test-time
views of the scan.

Why this source: it works for every family without retraining (the demo model, BrgSA,
CT-CLIP, COLIPRI, Merlin expose the same ``image_features``/``logits`` surface, and none
of them carries learned variances), and it covers both ways a zero-shot score can be
arbitrary: the *text* side (the knowledge base gives several phrasings of a finding and
of its negation; each present/absent pair is one ensemble member) and the *image* side
(small translations of the model's input crop, ``TTA_SHIFT_MM`` along each axis in turn;
a finding that is really in the scan survives a 5 mm shift of the crop, a score that
hangs on where the crop happens to fall does not). Left-right flips are not used: a
mirrored chest (heart on the right) is not a plausible scan and moves lateral findings.

The members' probabilities are ``sigmoid(score / T + b)`` with the finding's fitted
scaling, so they are on the same calibrated scale as the reported probability.
``uncertainty`` is the total predictive uncertainty, the binary entropy (bits, 0 to 1) of
the members' mean probability: it grows both with the spread between members and with
the mean's closeness to 0.5, the two ways a verdict can be a toss-up; the members' standard
deviation is kept beside it as ``uncertainty_std``. Why the entropy: on 120 shifted test
phantoms (``Testing/benchmarks/calibration_shift.py``, noise + venous contrast, Platt
scaling fitted on 120 others, tta=0) it tells wrong from right predictions with AUROC
0.780 pooled / 0.725 macro over findings, the std with 0.679 / 0.690. ``tta=0`` (the
default) encodes the image once, as before: the members are then the wordings only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from medalign.models.calibration import FindingCalibration

#: Translation of one test-time view, millimetres (a fraction of any finding's size
#: that matters, several voxels of every model grid).
TTA_SHIFT_MM = 5.0


def shifted_views(x: torch.Tensor, n: int, spacing: tuple[float, float, float]) -> Iterator[torch.Tensor]:
    """``n`` translated copies of the model-grid tensor ``x`` (B, C, X, Y, Z): +x, -x, +y,
    -y, +z, -z by ``TTA_SHIFT_MM``, then the same at twice, three times... the distance.
    What slides in at the border is the tensor's minimum (air/padding in every profile)."""
    if int(n) <= 0:
        return
    fill = x.amin()
    for k in range(int(n)):
        axis, sign, scale = k // 2 % 3, (1 if k % 2 == 0 else -1), 1 + k // 6
        step = max(1, round(scale * TTA_SHIFT_MM / float(spacing[axis])))
        step = min(step, x.shape[2 + axis] - 1)
        view = torch.roll(x, shifts=sign * step, dims=2 + axis)
        index = [slice(None)] * x.dim()
        index[2 + axis] = slice(0, step) if sign > 0 else slice(x.shape[2 + axis] - step, None)
        view[tuple(index)] = fill
        yield view


def member_probabilities(scores: torch.Tensor, scaling: FindingCalibration) -> torch.Tensor:
    """Calibrated probability of every ensemble member's present-minus-absent score."""
    return torch.sigmoid(scores.double() / float(scaling.temperature) + float(scaling.bias))


def predictive_std(scores: torch.Tensor, scaling: FindingCalibration) -> float:
    """Standard deviation of the members' calibrated probabilities (0 for one member)."""
    probs = member_probabilities(scores.flatten(), scaling)
    return float(probs.std(unbiased=False)) if probs.numel() > 1 else 0.0


def binary_entropy_bits(p: float) -> float:
    """H(p) = -p log2 p - (1 - p) log2 (1 - p): 0 for a sure verdict, 1 at p = 0.5."""
    p = min(max(float(p), 0.0), 1.0)
    return -sum(q * math.log2(q) for q in (p, 1.0 - p) if q > 0.0)


def predictive_entropy(scores: torch.Tensor, scaling: FindingCalibration) -> float:
    """Total predictive uncertainty: the binary entropy of the members' mean calibrated
    probability (it equals the members' mean entropy plus their disagreement, the mutual
    information, so neither a confident split ensemble nor an agreed coin toss reads sure)."""
    return binary_entropy_bits(float(member_probabilities(scores.flatten(), scaling).mean()))
