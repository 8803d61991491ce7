"""``medalign batch``: screen a cohort (a folder or a CSV of paths); torchrun shards it.

The work is ``medalign.inference.cohort.screen_cohort``; this module only reads the
command line and the torchrun environment and prints the counts.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

from medalign.cli.options import FINDINGS_HELP, add_adapter_argument, add_device_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch",
        help="screen many CTs (folder or CSV); several GPUs/machines through torchrun",
        description="Screen every CT in a folder (files or DICOM sub-folders) or listed in a CSV (column 'path', "
        "optional 'id'). Each case gets <out>/<id>/; cases done earlier with the same model, findings and maps "
        "are skipped, so a rerun resumes. Multi-GPU: torchrun --nproc_per_node=N -m medalign.cli batch ...",
    )
    p.add_argument("source", type=Path, help="folder of CTs, or CSV with a 'path' column (optional 'id')")
    p.add_argument("--out", required=True, type=Path, help="output folder (one sub-folder per case + summary.csv)")
    p.add_argument("--model", default=None, help="registry model name (default: medalign-demo)")
    p.add_argument("--findings", default=None, help=FINDINGS_HELP)
    add_device_argument(p)
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "bf16", "fp16"])
    p.add_argument("--no-maps", action="store_true", help="skip the alignment maps (faster)")
    add_adapter_argument(p)
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="data-loader processes that read (on a CPU also preprocess) the next CTs while the model "
                   "screens the current one (default 0: one after the other in this process)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Under torchrun (WORLD_SIZE > 1) every rank screens its share (rank::world), then waits
    for the others; rank 0 merges the shares' summaries into the one summary.csv."""
    from medalign.core.device import resolve_device
    from medalign.core.distributed import barrier, finish_distributed, setup_distributed
    from medalign.inference.cohort import merge_summaries, screen_cohort

    # a rank whose share was done earlier waits at the barrier for the others' hours of work
    world, rank, device = setup_distributed(resolve_device(args.device), timeout=timedelta(days=7))
    try:
        summary = screen_cohort(
            args.source, args.out, model=args.model, findings=args.findings,
            device=str(device), precision=args.precision,
            with_maps=not args.no_maps, rank=rank, world=world, workers=args.workers, adapter=args.adapter,
        )
        barrier(world)
        if rank != 0:
            return 0 if summary.count("failed") == 0 else 2
        if world > 1:
            summary = merge_summaries(args.source, args.out, world)
    finally:
        finish_distributed()
    print(f"{summary.line()}; summary: {summary.path}")
    return 0 if summary.count("failed") == 0 else 2
