"""``medalign adapt``: few-shot adaptation of a frozen model to a labelled cohort."""

from __future__ import annotations

import argparse
from pathlib import Path

from medalign.cli.options import FINDINGS_HELP, add_device_argument

METHODS = ("vip", "kmat", "vip+kmat")  # medalign.inference.adapter.METHODS, kept torch-free here


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adapt",
        help="adapt a model to your scans with K labelled cases per finding (encoders frozen)",
        description="Learns knowledge-anchored prompts (ViP context + merge prompts over the knowledge base's "
        "visual-symptom descriptors, K-MaT anchoring and optimal-transport alignment with patch tokens) from "
        "K cases with and K without each finding; writes a small adapter file for screen/batch/eval --adapter.",
    )
    p.add_argument("--data", required=True, type=Path, help="cohort folder (volumes/, labels.csv or reports.csv)")
    p.add_argument("--shots", required=True, type=int, metavar="K", help="cases with and without each finding")
    p.add_argument("--out", required=True, type=Path, help="adapter file to write (.safetensors)")
    p.add_argument("--model", default=None, help="registry model name (default: medalign-demo)")
    p.add_argument("--findings", default=None, help=FINDINGS_HELP + " (default: the labelled CT-RATE findings)")
    p.add_argument("--method", default="vip+kmat", choices=METHODS,
                   help="vip: context + merge prompts; kmat: context + anchoring + OT; vip+kmat: all (default)")
    p.add_argument("--epochs", type=int, default=50, help="full passes over the cached K-shot features (default 50)")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate of the prompt vectors (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="draws the K-shot cases and the OT subsets (default 0)")
    add_device_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medalign.core.errors import OutputError
    from medalign.inference.adapter import save_adapter
    from medalign.training.adapt import adapt

    if args.out.is_dir():
        raise OutputError(f"--out {args.out} is a folder; give the adapter file to write (e.g. {args.out / 'adapter.safetensors'}).")
    result = adapt(args.data, args.shots, model=args.model, findings=args.findings, method=args.method,
                   epochs=args.epochs, seed=args.seed, device=args.device, lr=args.lr)
    path = save_adapter(result.adapter, args.out)
    a = result.adapter
    print(f"adapted {len(a.findings)} findings of {a.model} ({a.method}, {a.shots} shots, {len(result.cases)} cases "
          f"encoded): loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    print(f"wrote {path}; use it with: medalign screen CT --adapter {path}")
    return 0
