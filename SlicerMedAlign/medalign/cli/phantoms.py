"""``medalign phantoms``: write a synthetic chest-CT dataset (volumes, masks, labels, reports)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "phantoms",
        help="generate synthetic chest CTs with finding masks, labels and reports",
        description="Write N synthetic chest CT phantoms to --out: volumes/*.nii.gz (int16 HU), "
        "masks/*.nii.gz (int32 bitmask, bit f = CT-RATE finding f), labels.csv, reports.csv "
        "and manifest.json. The same --seed always gives the same dataset.",
    )
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--n", type=int, default=10, help="number of phantoms (default 10)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--prevalence", type=float, default=0.3, help="probability of each finding, independently (default 0.3)")
    p.add_argument("--findings", default=None,
                   help='"A;B;..." CT-RATE names that may be inserted (default: all 18); the others stay absent')
    p.add_argument("--shift", default=None, metavar="NAME[,NAME]",
                   help="scan every phantom with scanner/protocol variants (a domain-shifted set; the same --seed "
                   "gives the same patients): noise (3x quantum noise), sharp or smooth (reconstruction kernel), "
                   "thick (5 mm slices), arterial or venous (contrast phase)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes building phantoms in parallel (default: every core); the output does not depend on it")
    p.add_argument("--progress-lines", action="store_true", help="machine-readable progress lines instead of a bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medalign.core.errors import InputError
    from medalign.core.progress import ProgressReporter
    from medalign.knowledge.findings import CT_RATE_FINDINGS, find
    from medalign.synth.phantoms import write_dataset
    from medalign.synth.shift import parse_shift

    findings = None
    if args.findings:
        findings = []
        for raw in str(args.findings).split(";"):
            if not raw.strip():
                continue
            item = find(raw)
            if item is None or item.name not in CT_RATE_FINDINGS:
                raise InputError(f"'{raw.strip()}' is not one of the 18 CT-RATE findings the phantoms can insert.")
            findings.append(item.name)
    shift = parse_shift(args.shift)  # a bad name is one sentence before any work
    if args.progress_lines:
        with ProgressReporter("phantoms", machine=True) as progress:
            out = write_dataset(Path(args.out), args.n, args.seed, prevalence=args.prevalence, progress=False,
                                on_progress=progress, findings=findings, workers=args.workers, shift=shift)
    else:
        out = write_dataset(Path(args.out), args.n, args.seed, prevalence=args.prevalence, progress=True, findings=findings,
                            workers=args.workers, shift=shift)
    print(f"wrote {args.n} phantoms to {out}", file=sys.stderr)
    return 0
