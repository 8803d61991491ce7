"""``medalign batch``: screen a cohort (a folder or a CSV of paths); torchrun shards it.

Each case gets its own results folder; a case that already has results.json is skipped,
so an interrupted run resumes; a bad case is recorded and the rest go on.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
from pathlib import Path

from medalign.cli.options import add_device_argument
from medalign.data.cohorts import VOLUME_SUFFIXES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch",
        help="screen many CTs (folder or CSV); several GPUs/machines through torchrun",
        description="Screen every CT in a folder (files or DICOM sub-folders) or listed in a CSV (column 'path'). "
        "Multi-GPU: torchrun --nproc_per_node=N -m medalign.cli batch ...",
    )
    p.add_argument("source", type=Path, help="folder of CTs, or CSV with a 'path' column (optional 'id')")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--model", default=None)
    p.add_argument("--findings", default=None)
    add_device_argument(p)
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "bf16", "fp16"])
    p.add_argument("--no-maps", action="store_true")
    p.set_defaults(func=run)


def list_inputs(source: Path) -> list[tuple[str, Path]]:
    from medalign.core.errors import InputError

    if source.is_file() and source.suffix.lower() == ".csv":
        with source.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or "path" not in rows[0]:
            raise InputError(f"{source} needs a 'path' column listing the CT files or DICOM folders.")
        base = source.parent
        return [
            (r.get("id") or Path(r["path"]).name.split(".")[0],
             (base / r["path"]) if not Path(r["path"]).is_absolute() else Path(r["path"]))
            for r in rows
        ]
    if source.is_dir():
        items = [p for p in sorted(source.iterdir()) if p.name.endswith(VOLUME_SUFFIXES) or (p.is_dir() and any(p.iterdir()))]
        if not items:
            raise InputError(f"{source} holds no CT files or DICOM folders.")
        return [(p.name.split(".")[0], p) for p in items]
    raise InputError(f"{source} is neither a folder nor a CSV file.")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from medalign.core.errors import MedAlignError
    from medalign.core.volume_io import atomic_write_text, read_volume
    from medalign.inference.screener import Screener

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = args.device
    if world > 1 and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = "cuda"  # resolve_device("cuda") now means this rank's GPU
    inputs = list_inputs(args.source)[rank::world]
    screener = Screener(model=args.model, findings=args.findings, device=device, precision=args.precision)
    rows = []
    for case_id, path in tqdm(inputs, desc=f"batch (rank {rank}/{world})" if world > 1 else "batch", unit="ct"):
        out = args.out / case_id
        if (out / "results.json").is_file():
            rows.append({"id": case_id, "path": str(path), "status": "done earlier", "error": ""})
            continue
        try:
            result = screener(read_volume(path), with_maps=not args.no_maps)
            result.input["path"] = str(path)
            result.write(out)
            top = result.ranked()[0]
            rows.append({"id": case_id, "path": str(path), "status": "ok", "error": "", "top_finding": top.name,
                         "top_probability": round(top.probability, 4)})
        except MedAlignError as exc:
            rows.append({"id": case_id, "path": str(path), "status": "failed", "error": str(exc)})
    args.out.mkdir(parents=True, exist_ok=True)
    name = "summary.csv" if world == 1 else f"summary.rank{rank}.csv"
    cols = ["id", "path", "status", "error", "top_finding", "top_probability"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(args.out / name, buf.getvalue())
    failed = sum(r["status"] == "failed" for r in rows)
    print(f"{len(rows) - failed} screened, {failed} failed; summary: {args.out / name}")
    return 0 if failed == 0 else 2

