"""Device, thread and precision choices, and the out-of-memory fallback to the CPU.

Screening must finish on whatever the user has: a workstation GPU that is already half
full, a laptop without CUDA, a container limited to a few cores.  These helpers make
the choice explicit and turn the failure modes into one sentence or a logged fallback.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TypeVar

import torch

from medalign.core.errors import MedAlignError

T = TypeVar("T")

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")
_PRECISIONS = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; an explicit but absent device is an error
    (silently running a 10-minute job on the CPU when a GPU was asked for helps nobody)."""
    text = (name or "auto").strip().lower()
    match = _DEVICE_RE.match(text)
    if not match:
        raise MedAlignError(f"Unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps).")
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        if index is not None:
            raise MedAlignError(f"Unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps).")
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not _mps_available():
            raise MedAlignError("The Apple GPU (mps) was requested but PyTorch cannot use it here; use --device cpu or auto.")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise MedAlignError(
            f"CUDA was requested ('{name}') but this PyTorch ({torch.__version__}) sees no CUDA GPU; "
            "use --device cpu or auto, or install a CUDA build of PyTorch."
        )
    count = torch.cuda.device_count()
    number = int(index) if index is not None else torch.cuda.current_device()
    if number >= count:
        raise MedAlignError(f"CUDA device {number} was requested but only {count} CUDA GPU(s) are visible.")
    return torch.device("cuda", number)


def available_cpus() -> int:
    """CPUs this process may really use: affinity mask, capped by a cgroup v2 CPU quota
    (containers started with ``--cpus`` keep every core visible but throttle them)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text(encoding="utf-8").split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def configure_cpu_threads() -> int:
    """Use every available core for CPU inference unless the user pinned a number.

    ``MEDALIGN_THREADS`` sets it explicitly; ``OMP_NUM_THREADS`` is left to PyTorch,
    which already honours it.  Returns the thread count now in effect.
    """
    explicit = os.environ.get("MEDALIGN_THREADS", "").strip()
    if explicit:
        try:
            threads = int(explicit)
            if threads < 1:
                raise ValueError
        except ValueError:
            raise MedAlignError(f"MEDALIGN_THREADS must be a positive whole number, not '{explicit}'.") from None
        torch.set_num_threads(threads)
        return torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    torch.set_num_threads(available_cpus())
    return torch.get_num_threads()


def _native_bf16() -> bool:
    """bf16 in hardware (Ampere and later); pre-Ampere GPUs only emulate it, slowly."""
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3 has no emulation flag and reports hardware support
        return bool(torch.cuda.is_bf16_supported())


def resolve_precision(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The compute dtype ``autocast`` will use: bf16 (else fp16) on CUDA, float32 elsewhere
    unless asked; fp16 on CPU is allowed but slow, so ``auto`` never picks it."""
    key = _PRECISIONS.get((precision or "auto").strip().lower())
    if key is None:
        raise MedAlignError(f"Unknown precision '{precision}' (use auto, float32, bf16 or fp16).")
    device = torch.device(device)
    if key == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if _native_bf16() else torch.float16
        return torch.float32
    if key == "bf16" and device.type == "cuda" and torch.cuda.is_available() and not _native_bf16():
        raise MedAlignError("This GPU does not support bfloat16; use --precision fp16 or float32.")
    return {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[key]


def autocast(device: torch.device, precision: str = "auto") -> AbstractContextManager:
    """Mixed precision for inference: a no-op for float32, ``torch.autocast`` otherwise.

    Autocast (not casting the weights) keeps numerically fragile ops such as softmax
    and norms in float32 while matmuls and convolutions run at half width.
    """
    dtype = resolve_precision(device, precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def is_oom(exc: BaseException) -> bool:
    """True for accelerator out-of-memory errors, including the older plain RuntimeErrors
    (cuBLAS/cuDNN allocation failures, MPS) that carry no dedicated type."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return "out of memory" in text or "cublas_status_alloc_failed" in text or "cudnn_status_alloc_failed" in text
    return False


def free_accelerator_memory() -> None:
    """Return cached blocks to the driver so a retry (or another process) can use them."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if _mps_available() and mps is not None and hasattr(mps, "empty_cache"):
        mps.empty_cache()


def run_with_fallback(
    fn: Callable[[torch.device], T],
    device: torch.device,
    log: Callable[[str], None] = print,
) -> T:
    """Run ``fn(device)``; if the GPU runs out of memory, free it and run ``fn`` on the CPU.

    ``fn`` must build everything it needs on the device it is given (model moved,
    tensors created there) so the retry is a clean second run, not a half-moved one.
    """
    device = torch.device(device)
    try:
        return fn(device)
    except Exception as exc:  # noqa: BLE001 (re-raised unless it is an accelerator OOM)
        if device.type not in ("cuda", "mps") or not is_oom(exc):
            raise
        message = (
            f"Out of GPU memory on {device}; retrying on the CPU, which is slower "
            "(free GPU memory or lower the batch size to stay on the GPU)."
        )
    # Outside the except block: the traceback (and the GPU tensors its frames hold)
    # is gone, so empty_cache can actually release that memory.
    free_accelerator_memory()
    log(message)
    return fn(torch.device("cpu"))


__all__ = [
    "autocast",
    "available_cpus",
    "configure_cpu_threads",
    "free_accelerator_memory",
    "is_oom",
    "resolve_device",
    "resolve_precision",
    "run_with_fallback",
]
