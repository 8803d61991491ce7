"""Training-side checkpoint handling: resuming a run where it stopped, starting from
another run's weights, and saving the optimizer state beside the model file.

The model file itself (weights + configuration header) is ``models.medalign_model``'s
``save_checkpoint``/``read_checkpoint``; here is only what training adds around it: the
``<out>.train_state.pt`` with optimizer, scheduler, step and batch generator, and the
checks that a checkpoint fits the model about to be trained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medalign.core.atomic import atomic_output
from medalign.core.errors import InputError
from medalign.models.medalign_model import MedAlignModel, load_state_strict, read_checkpoint, save_checkpoint
from medalign.training.config import TrainConfig


def train_state_path(out: Path) -> Path:
    """Where the optimizer/scheduler/step state of the checkpoint ``out`` lives."""
    return out.with_suffix(".train_state.pt")


def is_resumable(cfg: TrainConfig) -> bool:
    """True when ``cfg.out`` and its optimizer state exist and resuming is allowed."""
    return cfg.resume and train_state_path(cfg.out).is_file() and cfg.out.is_file()


def resume_state(cfg: TrainConfig) -> dict | None:
    """The saved optimizer/scheduler/step state when this run continues an earlier one."""
    return torch.load(train_state_path(cfg.out), weights_only=True) if is_resumable(cfg) else None


def load_init(model: MedAlignModel, path: Path) -> None:
    """Fine-tuning start: another run's weights, text projection included (so it stays frozen
    and the text warm-up is skipped); the model configuration must be the same."""
    require_config(model, path, "it cannot start this run")
    load_state_strict(model, read_checkpoint(path)[1], path.name)


def require_config(model: MedAlignModel, path: Path, consequence: str) -> None:
    """Refuse, from the file's header alone, a checkpoint trained with another configuration."""
    if read_checkpoint(path, tensors=False)[0].to_json() != model.cfg.to_json():
        raise InputError(f"{path} was trained with another model configuration; {consequence}.")


def restore(model: MedAlignModel, opt: torch.optim.Optimizer, sched, gen: torch.Generator, out: Path, state: dict) -> int:
    """Continue the run saved at ``out``: its weights, optimizer, schedule and batch
    generator, so the resumed run draws the same batches it would have. Returns the step."""
    _, tensors, _ = read_checkpoint(out)
    load_state_strict(model, tensors, out.name)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    return int(state["step"])


def save(model: MedAlignModel, opt: torch.optim.Optimizer, sched, gen: torch.Generator, step: int, cfg: TrainConfig,
         findings: list[str], history: list[float], seconds: float) -> None:
    """The model file with what the run was (its header's ``extra``), then the state to resume it."""
    extra = {
        "trained_findings": findings,
        "steps": step,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "decorrelate": cfg.decorrelate,
        "precision": cfg.precision,
        "init": str(cfg.init) if cfg.init is not None else None,
        "data": str(cfg.data),
        "initial_loss": float(np.mean(history[:20])) if history else None,
        "final_loss": float(np.mean(history[-20:])) if history else None,
        "train_seconds": round(seconds, 1),
    }
    save_checkpoint(model, cfg.out, extra=extra)
    state_path = train_state_path(cfg.out)
    with atomic_output(state_path) as tmp:
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                    "generator": gen.get_state()}, tmp)
