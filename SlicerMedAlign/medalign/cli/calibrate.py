"""``medalign calibrate``: fit Platt scalings (temperature and bias) on a labelled cohort and
store them with the model."""

from __future__ import annotations

import argparse
from pathlib import Path

from medalign.cli.options import FINDINGS_HELP, add_device_argument, add_tta_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="fit per-finding temperature and bias on labelled data so probabilities are calibrated",
        description="Screen a labelled cohort, fit each finding's temperature T and bias b "
        "(probability = sigmoid(score / T + b)) by minimising the negative log-likelihood under a weak "
        "prior centred on the model as shipped (T = 1, b = 0), and store it with the model: "
        "every later screen, batch, eval and the Slicer panel report calibrated probabilities. "
        "The ranking of cases (AUC) and which cases are flagged do not change.",
    )
    p.add_argument("--data", required=True, type=Path, help="cohort folder (volumes/, labels.csv or reports.csv)")
    p.add_argument("--model", default=None, help="registry model name (default: medalign-demo)")
    p.add_argument("--findings", default=None, help=FINDINGS_HELP + " (default: the labelled CT-RATE findings)")
    add_device_argument(p)
    add_tta_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medalign.data.cohorts import load_cohort
    from medalign.evaluation.calibrate import calibrate
    from medalign.evaluation.evaluate import labelled_findings
    from medalign.inference.screener import parse_findings

    findings = parse_findings(args.findings) if args.findings else labelled_findings(load_cohort(args.data))
    path, report = calibrate(args.data, model=args.model, device=args.device, tta=args.tta, findings=findings)
    print(f"{'finding':38s} {'n':>4s} {'pos':>4s} {'T':>7s} {'b':>6s}  "
          f"{'NLL before':>10s} {'after':>6s}  {'ECE before':>10s} {'after':>6s}")
    for name, r in report.items():
        print(f"{name[:38]:38s} {r['n']:4d} {r['positives']:4d} {r['temperature']:7.3f} {r['bias']:6.2f}  {r['nll_before']:10.3f} "
              f"{r['nll_after']:6.3f}  {r['ece_before']:10.3f} {r['ece_after']:6.3f}")
    print(f"wrote {path}")
    return 0
