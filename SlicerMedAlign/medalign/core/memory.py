"""Will a volume fit in memory?  Decided from its header, before a single voxel is decoded.

A 2.5 MB .nii.gz can announce 1024^3 voxels: decoding and screening it takes many GB, and
the kernel's OOM killer ends the process minutes later without a word.  The estimate is
the peak memory that screening a volume adds per voxel, measured (not guessed) with
``Testing/benchmarks/memory_peak.py``: peak RSS of ``medalign screen`` (18 findings with
maps, demo model, CPU, glibc's default allocator) on synthetic CTs, in MiB:

    source    64x256x256 (4.2 M voxels)   256x512x512 (67 M voxels)   slope
    int16     761                         2087                        22.1 bytes/voxel
    float32   801                         2207                        23.4 bytes/voxel

above a fixed ~0.7 GB (Python, torch, the model).  Rounded up: 23 bytes per voxel, one
more for a floating-point source.  The fixed part depends on the model and is not
counted: the guard is for volumes that cannot fit at all, not a promise that everything
else will.
"""

from __future__ import annotations

import os
from pathlib import Path

from medalign.core.errors import InputError

#: Peak bytes screening adds per voxel of an integer (int16) source; measured, see above.
BYTES_PER_VOXEL = 23
#: Extra bytes per voxel when the source is floating point (decoded as float32).
FLOAT_EXTRA_BYTES_PER_VOXEL = 1
#: ``MEDALIGN_MEMORY_CHECK=off`` skips the guard (e.g. when swap or overcommit is trusted).
OPT_OUT = "MEDALIGN_MEMORY_CHECK"

__all__ = ["BYTES_PER_VOXEL", "available_bytes", "check_volume_fits", "screening_bytes"]


def screening_bytes(voxels: int, floating: bool) -> int:
    """Peak memory screening a volume of ``voxels`` adds, by the measured rule above."""
    return int(voxels) * (BYTES_PER_VOXEL + (FLOAT_EXTRA_BYTES_PER_VOXEL if floating else 0))


def _cgroup_room() -> int | None:
    """Bytes left under a cgroup v2 memory limit (containers, Slurm jobs); None if unlimited."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text(encoding="utf-8").strip()
        if limit == "max":
            return None
        used = int(Path("/sys/fs/cgroup/memory.current").read_text(encoding="utf-8").strip())
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def available_bytes() -> int | None:
    """Memory this process can still get: the system's available memory, capped by a
    cgroup limit; None when it cannot be told (then nothing is refused)."""
    try:
        import psutil

        free: int | None = int(psutil.virtual_memory().available)
    except (ImportError, OSError):
        free = None
    room = _cgroup_room()
    if free is None or room is None:
        return free if room is None else room
    return min(free, room)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def check_volume_fits(name: str, size_ijk: tuple[int, ...], floating: bool) -> None:
    """Refuse, in one sentence, a volume whose screening cannot fit in the available memory."""
    if os.environ.get(OPT_OUT, "").strip().lower() in ("off", "0", "no", "false"):
        return
    voxels = 1
    for n in size_ijk:
        voxels *= max(1, int(n))
    need = screening_bytes(voxels, floating)
    free = available_bytes()
    if free is None or need <= free:
        return
    shape = "x".join(str(int(n)) for n in size_ijk)
    raise InputError(
        f"{name} is {shape} voxels; screening it needs about {_gb(need)} of memory but only {_gb(free)} is "
        f"available, so it was not loaded (crop or downsample it, or free memory; {OPT_OUT}=off skips this check)."
    )
