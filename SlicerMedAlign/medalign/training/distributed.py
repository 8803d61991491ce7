"""Several training processes through ``torchrun``: the DistributedDataParallel wrapper;
rank, world size, process group and each rank's device come from ``core.distributed``
(cohort screening shards with them too).  A plain ``python`` run is world size 1."""

from __future__ import annotations

import torch

from medalign.core.distributed import barrier, dist_info, setup_distributed

__all__ = ["barrier", "dist_info", "setup_distributed", "wrap"]


def wrap(model: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """The module the training step calls: DistributedDataParallel over ``model`` when
    there are several processes (it averages gradients), ``model`` itself otherwise."""
    if world <= 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
