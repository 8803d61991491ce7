"""Does a model respond to a finding at all?  Scores phantom twins: the same anatomy with one
finding on and with it off.

Each pair is ``make_phantom(seed, labels=...)`` twice.  Since phantom generator 1.3 every
painter and the scanner stage draw from streams of their own, so the twins are identical
outside the lesion: anatomy, other lesions, devices, noise (Cardiomegaly and Pericardial
effusion change the heart itself, and enlarged nodes replace the normal small ones).
A test set's AUC mixes two failures: a model blind to the lesion, and one that sees it but
is outscored by look-alikes elsewhere in the scan.  ``--others off`` (the default) turns
every other finding off, which removes the look-alikes: a paired win rate near 0.5 there
means the score does not move with the lesion at all.  ``--others drawn`` keeps other
findings, drawn per pair with probability 0.3 and the same in both twins.

Printed per finding: paired win rate (score with the lesion above score without), AUC over
all twins, median score change (present-minus-absent logit), and for the twin with the
lesion the pointing game (map peak inside the lesion, strictly and within the tolerance)
and the map's voxel AUC against the lesion.

    python Testing/benchmarks/counterfactual_twins.py --pairs 20
    python Testing/benchmarks/counterfactual_twins.py --model NAME --findings "Lung nodule;Consolidation"

Measured for the model card (demo model version 5, generator 1.3, 2-core CPU, 8 minutes
for 20 pairs of all 18 findings; full table in its "Counterfactual twins" section): the
large and diffuse findings win every pair and move the score by 1.5-8.9 logits; lung nodule
wins 18 of 20 pairs but moves it by 0.02; the calcifications, enlarged nodes and fibrotic
sequela do not move it at all (wins 0.25-0.80, median change 0.00).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from medalign.core.volume import Volume
from medalign.evaluation.evaluate import localization, mask_bit
from medalign.inference.screener import Screener
from medalign.knowledge.findings import CT_RATE_FINDINGS
from medalign.synth.phantoms import make_phantom

FIRST_SEED = 900000  # far from the seeds the demo data sets use (1, 2, 3 and their cases)
PREVALENCE = 0.3  # as in the demo model's training phantoms


def other_findings(seed: int, mode: str) -> dict[str, int]:
    """The labels both twins share: all off, or drawn from the pair's seed."""
    rng = np.random.default_rng(seed)
    return {name: int(mode == "drawn" and rng.random() < PREVALENCE) for name in CT_RATE_FINDINGS}


def twin_scores(screener: Screener, finding: str, seed: int, tolerance_mm: float, others: str = "off") -> dict:
    """Scores of one twin pair and where the map of the twin with the lesion peaks."""
    off = other_findings(seed, others)
    j = screener.findings.index(finding)
    out = {}
    for label in (1, 0):
        phantom = make_phantom(seed, labels=off | {finding: label})
        result = screener(phantom.volume, with_maps=bool(label), check=False).findings[j]
        out["score_on" if label else "score_off"] = result.score
        if label and result.map is not None:  # a map without a hotspot points nowhere: a miss
            mask = Volume(phantom.mask, phantom.volume.ijk_to_ras)
            lesion = mask_bit(mask, finding)
            peak = result.hotspot.ras if result.hotspot is not None else None
            loc = localization(result.map, peak, mask, lesion, tolerance_mm)
            out["hit"], out["hit_tolerant"], out["voxel_auc"] = loc["hit"], loc["hit_tolerant"], loc["voxel_auc"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="registered model name (default: the embedded demo model)")
    ap.add_argument("--findings", default=None, help="';'-separated findings (default: all 18 CT-RATE findings)")
    ap.add_argument("--pairs", type=int, default=20, help="twin pairs per finding")
    ap.add_argument("--first-seed", type=int, default=FIRST_SEED)
    ap.add_argument("--others", choices=("off", "drawn"), default="off", help="other findings: all off, or drawn per pair")
    ap.add_argument("--tolerance-mm", type=float, default=10.0, help="pointing game tolerance")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    findings = args.findings.split(";") if args.findings else list(CT_RATE_FINDINGS)
    screener = Screener(model=args.model, findings=findings, device=args.device)
    print(f"model {screener.model_name}, {args.pairs} pairs per finding, seeds {args.first_seed}.."
          f"{args.first_seed + args.pairs - 1}, other findings {args.others}")
    print(f"{'finding':36s} {'win':>5s} {'AUC':>6s} {'Δscore':>7s} {'point':>6s} {'±tol':>6s} {'vox AUC':>8s}")
    for finding in findings:
        rows = defaultdict(list)
        for i in tqdm(range(args.pairs), desc=finding[:24], leave=False):
            for key, value in twin_scores(screener, finding, args.first_seed + i, args.tolerance_mm, args.others).items():
                rows[key].append(value)
        on, off = np.array(rows["score_on"]), np.array(rows["score_off"])
        auc = roc_auc_score(np.r_[np.ones(len(on)), np.zeros(len(off))], np.r_[on, off])
        # the voxel AUC samples every 2nd voxel, which can miss a 2 mm calcification entirely
        vox = [v for v in rows["voxel_auc"] if np.isfinite(v)]
        vox_text = f"{np.mean(vox):8.3f}" if vox else f"{'n/a':>8s}"
        print(f"{finding:36s} {np.mean(on > off):5.2f} {auc:6.3f} {np.median(on - off):7.2f} "
              f"{np.mean(rows['hit']):6.2f} {np.mean(rows['hit_tolerant']):6.2f} {vox_text}", flush=True)


if __name__ == "__main__":
    main()
