"""Agreement of the rule-based report labeller with CT-RATE's manual labels.

Prints per-label precision, recall and F1 (positive class) and the macro F1 over the
18 findings. The reports are CC BY-NC-SA: this script reads them from ../shared (or
$MEDALIGN_SHARED) at run time and never stores them.

    python Testing/benchmarks/eval_report_labeler.py [--csv PATH] [--uncertain-as 0|1]
        [--errors "Lung nodule"]   # print the sentences behind its false calls (local debugging)
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

from medalign.data.report_labeller import find_mentions, label_report
from medalign.knowledge.findings import CT_RATE_FINDINGS

REPO = Path(__file__).resolve().parents[2]
DEFAULT = Path(os.environ.get("MEDALIGN_SHARED", REPO.parent / "shared")) / "data" / "reports" / "ctrate_labeled_reports_800.csv"


def f1_table(truth: list[dict[str, int]], pred: list[dict[str, int]], findings: list[str]) -> dict[str, dict[str, float]]:
    """Per-finding precision/recall/F1 of the positive class plus support."""
    table = {}
    for f in findings:
        tp = sum(1 for t, p in zip(truth, pred) if t[f] and p[f])
        fp = sum(1 for t, p in zip(truth, pred) if not t[f] and p[f])
        fn = sum(1 for t, p in zip(truth, pred) if t[f] and not p[f])
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        table[f] = {"precision": prec, "recall": rec, "f1": f1, "support": tp + fn, "fp": fp, "fn": fn}
    return table


def evaluate(path: Path, uncertain_as: int = 1) -> tuple[dict[str, dict[str, float]], float, list[dict], list[dict], list[dict]]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    truth = [{f: int(r[f]) for f in CT_RATE_FINDINGS} for r in rows]
    pred = [label_report(r["report_text"], uncertain_as=uncertain_as) for r in rows]
    table = f1_table(truth, pred, CT_RATE_FINDINGS)
    macro = sum(v["f1"] for v in table.values()) / len(table)
    return table, macro, rows, truth, pred


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=DEFAULT)
    ap.add_argument("--uncertain-as", type=int, choices=(0, 1), default=1)
    ap.add_argument("--errors", default=None, help="finding whose false positives/negatives to print")
    ap.add_argument("--limit", type=int, default=15)
    args = ap.parse_args(argv)
    if not args.csv.is_file():
        print(f"reports not found: {args.csv} (set MEDALIGN_SHARED)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    table, macro, rows, truth, pred = evaluate(args.csv, args.uncertain_as)
    dt = time.perf_counter() - t0
    print(f"{'finding':36s} {'prec':>6s} {'rec':>6s} {'F1':>6s} {'n+':>5s} {'FP':>4s} {'FN':>4s}")
    for f, v in table.items():
        print(f"{f:36s} {v['precision']:6.3f} {v['recall']:6.3f} {v['f1']:6.3f} {v['support']:5d} {v['fp']:4d} {v['fn']:4d}")
    exact = sum(1 for t, p in zip(truth, pred) if t == p)
    print(f"{'macro F1':36s} {'':6s} {'':6s} {macro:6.3f}")
    print(f"reports: {len(rows)}, all 18 labels exact: {exact}, {1000 * dt / len(rows):.1f} ms/report")
    if args.errors:
        f = args.errors
        shown = 0
        for r, t, p in zip(rows, truth, pred):
            if t[f] == p[f] or shown >= args.limit:
                continue
            shown += 1
            kind = "FP" if p[f] else "FN"
            ms = [m for m in find_mentions(r["report_text"], [f])]
            print(f"--- {kind} {r['AccessionNo']}: mentions={[(m.text, m.negated, m.uncertain) for m in ms]}")
            if kind == "FN":
                print(r["report_text"][:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
