"""Several training processes through ``torchrun``: rank and world size from its
environment, the process group, each rank's device and the DistributedDataParallel
wrapper.  A plain ``python`` run is world size 1 and none of this does anything."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def dist_info() -> tuple[int, int, int]:
    """(world size, global rank, local rank) as ``torchrun`` sets them; (1, 0, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def setup_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the process group when launched by ``torchrun``; returns (world, rank, device),
    the device being this rank's own GPU when there are several processes on GPUs."""
    world, rank, local = dist_info()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    return world, rank, device


def wrap(model: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """The module the training step calls: DistributedDataParallel over ``model`` when
    there are several processes (it averages gradients), ``model`` itself otherwise."""
    if world <= 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def barrier(world: int) -> None:
    """Wait for every rank (rank 0 saves the checkpoint while the others finish)."""
    if world > 1:
        dist.barrier()
