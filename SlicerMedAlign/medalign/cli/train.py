"""``medalign train``: train a MedAlign model on a cohort of CT volumes with reports."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from medalign.cli.options import add_device_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on CT volumes + reports (phantoms or your own cohort)",
        description="Contrastive image-report training with BrgSA's knowledge-bank losses and finding prompts. "
        "Several GPUs or machines: torchrun --nproc_per_node=N -m medalign.cli train ...",
    )
    p.add_argument("--data", required=True, type=Path, help="cohort folder: volumes/, reports.csv, optional labels.csv")
    p.add_argument("--out", required=True, type=Path, help="checkpoint to write (.safetensors)")
    p.add_argument("--val-data", type=Path, default=None, help="held-out cohort: picks per-finding thresholds and reports metrics")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    add_device_argument(p)
    p.add_argument("--cache", type=Path, default=None, help="folder for preprocessed tensors (reused across runs)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes preprocessing the volumes (default: every core); training does not depend on it")
    p.add_argument("--decorrelate", type=float, default=1.0,
                   help="weight that makes the findings' present-minus-absent text directions orthogonal before "
                   "training, so one finding's score does not follow another's (0: demo models 1-4's warm-up)")
    p.add_argument("--init", default=None, metavar="CKPT|MODEL",
                   help="start from these weights with a fresh optimizer: a checkpoint file or a registered medalign "
                   "model such as medalign-demo (fine-tune it on your cohort); its text projection stays as it is")
    p.add_argument("--precision", default="float32", choices=["float32", "bf16"],
                   help="bf16: mixed precision (bfloat16 autocast; weights, optimizer and checkpoint stay "
                   "float32), for GPUs with bfloat16")
    arch = p.add_argument_group("model size (new runs; --init and a resumed run keep their own size)")
    arch.add_argument("--local-blocks", type=int, default=None, metavar="N",
                      help="residual 3x3x3 convolution blocks on the 16 mm local path (default 0, as the demo model); "
                      "more depth for small lesions, for GPU training")
    arch.add_argument("--vit-depth", type=int, default=None, metavar="N", help="transformer layers (default 2)")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint and its state exist")
    p.set_defaults(func=run)


def _init_weights(spec: str | None) -> Path | None:
    """A checkpoint file as given, or a registered model's hash-checked weights."""
    if spec is None:
        return None
    if Path(spec).is_file() or spec.endswith(".safetensors") or "/" in spec or "\\" in spec:
        return Path(spec)  # a file; a missing one is reported by the checkpoint reader
    from medalign.core.errors import InputError
    from medalign.models.registry import get, resolve_weights

    entry = get(spec)  # an unknown name is one sentence listing the known ones
    if entry.family != "medalign":
        raise InputError(f"--init needs a medalign-family model; '{spec}' is {entry.family}.")
    return resolve_weights(entry)


def _model_config(args: argparse.Namespace, init: Path | None, resuming: bool):
    """The architecture to train: the --init weights' own, the run being continued's own, or the
    defaults changed by the size flags (a resumed run refuses flags that change its size)."""
    import dataclasses

    from medalign.core.errors import InputError
    from medalign.models.medalign_model import MedAlignConfig, read_checkpoint

    if args.local_blocks is not None and args.local_blocks < 0:
        raise InputError(f"--local-blocks must be 0 or more; got {args.local_blocks}.")
    if args.vit_depth is not None and args.vit_depth < 1:
        raise InputError(f"--vit-depth must be at least 1; got {args.vit_depth}.")
    if init is not None:
        if args.local_blocks is not None or args.vit_depth is not None:
            raise InputError(f"--init {init.name} fixes the model size; leave out --local-blocks and --vit-depth.")
        return read_checkpoint(init, tensors=False)[0]
    cfg = read_checkpoint(args.out, tensors=False)[0] if resuming else MedAlignConfig()
    if args.local_blocks is not None:
        cfg = dataclasses.replace(cfg, local_blocks=args.local_blocks)
    if args.vit_depth is not None:
        cfg = dataclasses.replace(cfg, vit=dataclasses.replace(cfg.vit, depth=args.vit_depth))
    return cfg


def run(args: argparse.Namespace) -> int:
    from medalign.training.calibration import calibrate
    from medalign.training.checkpoint import is_resumable
    from medalign.training.config import TrainConfig
    from medalign.training.loop import train

    init = _init_weights(args.init)
    cfg = TrainConfig(
        data=args.data, out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        device=args.device, cache=args.cache, workers=args.workers, resume=not args.no_resume, val_data=args.val_data,
        decorrelate=args.decorrelate, init=init, precision=args.precision,
    )
    cfg.model_config = _model_config(args, init, is_resumable(cfg))
    path = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports and calibrates
        return 0
    print(f"checkpoint: {path}")
    if args.val_data is not None:
        from medalign.inference.results import MIN_FLAG_AUC, is_near_chance

        calibration = calibrate(path, args.val_data, device=args.device)
        print(f"per-finding threshold and AUC on {args.val_data}: "
              + ", ".join(f"{k} {v['threshold']:.2f} (AUC {v['auc']:.2f})" for k, v in calibration.items()))
        near_chance = [k for k, v in calibration.items() if is_near_chance(v["auc"])]
        if near_chance:
            print(f"never flagged (held-out AUC below {MIN_FLAG_AUC}): " + ", ".join(near_chance))
    return 0
