"""What a training run is asked to do: data, output, schedule, loss weights, precision."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from medalign.core.errors import InputError
from medalign.models.medalign_model import MedAlignConfig


@dataclass
class TrainConfig:
    """Everything one ``medalign train`` run is asked for (the CLI fills it from its flags)."""

    data: Path
    out: Path
    steps: int = 1200
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup: int = 60
    seed: int = 0
    clip_weight: float = 0.25
    local_weight: float = 1.0
    prior_negatives: bool = True  # weigh lesion-free tokens by where lesions usually are (lesion_prior)
    mse_weight: float = 0.5
    # weight of the warm-up penalty that makes findings' present-minus-absent text directions
    # orthogonal (see decision_directions); 0 keeps demo versions 1-4's warm-up
    decorrelate: float = 1.0
    init: Path | None = None  # start from these weights (fine-tuning) with a fresh optimizer
    val_data: Path | None = None
    resume: bool = True
    save_every: int = 200
    device: str = "auto"
    cache: Path | None = None
    findings: list[str] | None = None
    workers: int | None = 1  # preprocessing processes (None: every core, shared among torchrun ranks)
    # "bf16": forward and losses under bfloat16 autocast (weights, optimizer and checkpoint stay
    # float32); faster on recent GPUs, no loss scaling needed
    precision: str = "float32"
    model_config: MedAlignConfig = field(default_factory=MedAlignConfig)


def check_precision(precision: str, device: torch.device) -> None:
    """Training runs in float32 or bf16; fp16 would need loss scaling, which is not worth it here."""
    from medalign.core.device import resolve_precision

    if precision == "auto" or resolve_precision(device, precision) == torch.float16:
        raise InputError(f"Training precision must be float32 or bf16, not {precision!r}.")
