#!/usr/bin/env python
"""Benchmark: calibration of the demo model on a domain-shifted phantom test set.

Two disjoint shifted phantom sets (``--shift``, default "noise,venous": three times the
quantum noise and portal-venous contrast, neither of which the demo model was trained
on): a calibration set (seed 101) and a test set (seed 202). Steps:

1. screen the test set with the model as shipped (temperature 1): AUC, ECE, uncertainty AUROC;
2. fit per-finding temperatures on the calibration set (``evaluation.calibrate``, in
   memory: the user's registry is not touched);
3. screen the test set again with the fitted calibration: AUC (unchanged), ECE, NLL,
   uncertainty AUROC for wrong vs right predictions (p >= 0.5).

ECE: 10 equal-width bins, per finding (macro mean) and over every (case, finding) pair
pooled. Not a test: ``python Testing/benchmarks/calibration_shift.py [--n-cal 60]
[--n-test 60] [--tta 2] [--shift noise,venous] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _summary(cohort, label: str) -> dict:
    from sklearn.metrics import roc_auc_score

    from medalign.evaluation.calibration import expected_calibration_error, uncertainty_auroc

    per = {}
    ys, ps, us = [], [], []
    for j, name in enumerate(cohort.names):
        known = cohort.labels[:, j] >= 0
        y, p, u = cohort.labels[known, j], cohort.probs[known, j], cohort.uncertainty[known, j]
        ys.append(y), ps.append(p), us.append(u)
        two = len(np.unique(y)) == 2
        per[name] = {"auc": float(roc_auc_score(y, p)) if two else float("nan"),
                     "ece": expected_calibration_error(y, p), "unc_auroc": uncertainty_auroc(y, p, u)}
    y, p, u = np.concatenate(ys), np.concatenate(ps), np.concatenate(us)
    macro = {k: float(np.nanmean([v[k] for v in per.values()])) for k in ("auc", "ece", "unc_auroc")}
    pooled = {"ece": expected_calibration_error(y, p), "unc_auroc": uncertainty_auroc(y, p, u)}
    print(f"{label:28s} macro AUC {macro['auc']:.3f}  macro ECE {macro['ece']:.3f}  pooled ECE {pooled['ece']:.3f}  "
          f"uncertainty AUROC pooled {pooled['unc_auroc']:.3f} (macro {macro['unc_auroc']:.3f})", flush=True)
    return {"per_finding": per, "macro": macro, "pooled": pooled}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--n-cal", type=int, default=60)
    ap.add_argument("--n-test", type=int, default=60)
    ap.add_argument("--tta", type=int, default=2)
    ap.add_argument("--shift", default="noise,venous")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from medalign.evaluation.calibrate import fitted_calibration, score_cohort
    from medalign.inference.screener import Screener
    from medalign.synth.phantoms import write_dataset

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cal = write_dataset(Path(tmp) / "cal", args.n_cal, seed=101, progress=False, workers=args.workers, shift=args.shift)
        test = write_dataset(Path(tmp) / "test", args.n_test, seed=202, progress=False, workers=args.workers, shift=args.shift)
        print(f"phantoms ({args.shift}): {args.n_cal} calibration + {args.n_test} test, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        screener = Screener(model="medalign-demo", device="cpu", tta=args.tta)
        shipped = screener.model.calibration
        before = _summary(score_cohort(test, screener, progress=False), "shipped (T = 1)")
        fitted, report = fitted_calibration(score_cohort(cal, screener, progress=False), shipped, "benchmark")
        screener.model.calibration = fitted
        after = _summary(score_cohort(test, screener, progress=False), "temperature-scaled")
        screener.model.calibration = shipped
    print(f"{'finding':38s} {'T':>6s} {'ECE before':>10s} {'after':>6s} {'AUC':>6s} {'unc AUROC':>9s}")
    for name, b in before["per_finding"].items():
        a = after["per_finding"][name]
        print(f"{name:38s} {report[name]['temperature']:6.2f} {b['ece']:10.3f} {a['ece']:6.3f} {a['auc']:6.3f} "
              f"{a['unc_auroc']:9.3f}")
    print(f"total {time.perf_counter() - start:.0f} s (CPU, tta={args.tta})")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "before": before, "after": after,
                                         "temperatures": {k: v["temperature"] for k, v in report.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
