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
        "The ranking of cases (AUC) and which cases are flagged do not change. "
        "With --adapter the scalings are fitted on the adapted scores and stored in the adapter file.",
    )
    p.add_argument("--data", required=True, type=Path, help="cohort folder (volumes/, labels.csv or reports.csv)")
    p.add_argument("--model", default=None,
                   help="registry model name (default: the adapter's model with --adapter, else medalign-demo)")
    p.add_argument("--findings", default=None, help=FINDINGS_HELP + " (default: the labelled CT-RATE findings; "
                   "with --adapter: the adapter's findings)")
    p.add_argument("--adapter", default=None, type=Path, metavar="FILE",
                   help="few-shot adapter from medalign adapt: calibrate screening WITH it and store the result in "
                   "this file (the model's own calibration is left alone)")
    add_device_argument(p)
    add_tta_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medalign.data.cohorts import load_cohort
    from medalign.evaluation.calibrate import calibrate
    from medalign.evaluation.evaluate import labelled_findings
    from medalign.inference.screener import parse_findings

    if args.adapter is not None:
        from medalign.evaluation.calibrate import calibrate_adapter

        path, report = calibrate_adapter(args.data, args.adapter, model=args.model, device=args.device, tta=args.tta,
                                         findings=parse_findings(args.findings) if args.findings else None)
        _print_report(report)
        print(f"wrote the adapter's calibration into {path}")
        return 0
    findings = parse_findings(args.findings) if args.findings else labelled_findings(load_cohort(args.data))
    path, report = calibrate(args.data, model=args.model, device=args.device, tta=args.tta, findings=findings)
    _print_report(report)
    print(f"wrote {path}")
    return 0


def _print_report(report: dict) -> None:
    print(f"{'finding':38s} {'n':>4s} {'pos':>4s} {'T':>7s} {'b':>6s}  "
          f"{'NLL before':>10s} {'after':>6s}  {'ECE before':>10s} {'after':>6s}")
    for name, r in report.items():
        print(f"{name[:38]:38s} {r['n']:4d} {r['positives']:4d} {r['temperature']:7.3f} {r['bias']:6.2f}  {r['nll_before']:10.3f} "
              f"{r['nll_after']:6.3f}  {r['ece_before']:10.3f} {r['ece_after']:6.3f}")
