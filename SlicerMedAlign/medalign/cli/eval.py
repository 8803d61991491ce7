"""``medalign eval``: metrics of a model on a labelled cohort."""

from __future__ import annotations

import argparse
from pathlib import Path

from medalign.cli.options import FINDINGS_HELP, add_adapter_argument, add_device_argument, add_tta_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a model on a labelled cohort (AUC, ACC, weighted F1, precision, localization)",
        description="Per-finding AUC with bootstrap 95% intervals, ACC / weighted F1 / precision at the ROC point "
        "nearest (0, 1), ROC curves, calibration (expected calibration error over 10 equal-width bins, NLL, "
        "the uncertainty's AUROC for wrong vs right predictions at p >= 0.5, reliability.png), and pointing "
        "game + voxel AUC where lesion masks exist.",
    )
    p.add_argument("--data", required=True, type=Path, help="cohort folder (volumes/, labels.csv or reports.csv, optional masks/)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--model", default=None, help="registry model name (default: medalign-demo)")
    p.add_argument("--weights", default=None, type=Path, help="evaluate this checkpoint instead of a registry entry")
    p.add_argument("--findings", default=None, help=FINDINGS_HELP + " (default: the labelled CT-RATE findings)")
    add_device_argument(p)
    add_tta_argument(p)
    add_adapter_argument(p)
    p.add_argument("--bootstrap", type=_resamples, default=1000, metavar="N",
                   help="bootstrap resamples for the 95%% intervals (default 1000; 0: no intervals, fastest)")
    p.set_defaults(func=run)


def _resamples(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of resamples (0 or more)")
    return n


def run(args: argparse.Namespace) -> int:
    from medalign.evaluation.evaluate import evaluate
    from medalign.inference.screener import parse_findings

    model = args.model
    if args.weights is not None:
        from medalign.models import load

        model = load(args.model or "medalign-demo", weights=args.weights)
    findings = parse_findings(args.findings) if args.findings else None
    summary = evaluate(args.data, args.out, model=model, findings=findings, device=args.device, n_boot=args.bootstrap,
                       tta=args.tta, adapter=args.adapter)
    macro = summary["macro"]
    print(f"{summary['model']} on {summary['cases']} cases: " + ", ".join(f"{k} {v:.3f}" for k, v in macro.items()))
    for name, e in summary["findings"].items():
        auc = e.get("auc", {}).get("value", float("nan"))
        extra = (
            f"  pointing {e['pointing_game']:.2f} (±{summary['tolerance_mm']:.0f} mm: {e['pointing_game_tolerant']:.2f})"
            if "pointing_game" in e else ""
        )
        cal = f"  ECE {e['ece']:.3f}" if "ece" in e else ""
        print(f"  {name:38s} AUC {auc:.3f}{cal}{extra}")
    print(f"wrote {args.out}/metrics.json, metrics.csv, predictions.csv, roc.png, reliability.png")
    return 0
