"""glibc's allocator settings for the torch commands.

By default glibc serves every large block (a 3D activation is tens of MB) from a fresh
``mmap`` and returns it to the kernel when freed, so each training or screening step
pays for zero-filling the same memory again: on 2 CPU cores `medalign train` spent 39%
of its CPU time in the kernel.  Raising the mmap and trim thresholds keeps freed blocks
in the process for reuse.  Measured on 60 steps of the demo model's training (2 cores,
identical losses): 1.52 -> 1.11 s per step, system time 57 -> 14 s.

glibc reads these settings only when a process starts, so ``medalign train`` re-runs
itself once with them (``reexec_with_tuned_allocator``).  Torch-free on purpose: this
runs before anything heavy is imported.

Screening does not use them: freed blocks kept in the process raise its peak memory,
and screening allocates a few large volume-sized arrays once rather than the same
activations every step.  Peak RSS of ``medalign screen`` (18 findings with maps, 2 CPU
cores, ``Testing/benchmarks/memory_peak.py``), tuned vs glibc defaults:
64x256x256 825 vs 761 MB, 128x512x512 2033 vs 1376 MB, 256x512x512 2890 vs 2087 MB
(133 vs 118 s); issue 22 reported 6.9 vs 3.6 GB on a 512^3 CT.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

#: 4 GiB: larger than any single tensor of these models, so no block is mmapped or trimmed.
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
OPT_OUT = "MEDALIGN_MALLOC"  # "system": keep glibc's defaults


def tuned_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to re-run this process with, or None when there is nothing to do:
    not glibc, the user already set ``GLIBC_TUNABLES``, or opted out with
    ``MEDALIGN_MALLOC=system``."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    if "GLIBC_TUNABLES" in environ or environ.get(OPT_OUT, "").strip().lower() == "system":
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
    return env


def reexec_with_tuned_allocator(args: list[str]) -> None:
    """Replace this process by ``python -m medalign.cli ARGS`` with the tuned allocator;
    returns (and the command runs untuned) when that is not needed or not possible."""
    env = tuned_environment(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, "-m", "medalign.cli", *args], env)
    except OSError:
        return
