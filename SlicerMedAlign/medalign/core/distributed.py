"""Several processes through ``torchrun``: rank and world size from its environment, the
process group and each rank's device. A plain ``python`` run is world size 1 and none of
this does anything. Shared by training (gradients) and cohort screening (sharding)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def dist_info() -> tuple[int, int, int]:
    """(world size, global rank, local rank) as ``torchrun`` sets them; (1, 0, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def setup_distributed(device: torch.device, timeout: timedelta | None = None) -> tuple[int, int, torch.device]:
    """Join the process group when launched by ``torchrun`` (nccl on GPUs, gloo otherwise);
    returns (world, rank, device), the device being this rank's own GPU when there are
    several processes on GPUs. ``timeout``: how long a collective (a barrier) may wait."""
    world, rank, local = dist_info()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, **({"timeout": timeout} if timeout is not None else {}))
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    return world, rank, device


def barrier(world: int) -> None:
    """Wait for every rank (e.g. rank 0 writes what all ranks made once they are done)."""
    if world > 1:
        dist.barrier()


def finish_distributed() -> None:
    """Leave the process group, if this process joined one (torch warns about one left open)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
