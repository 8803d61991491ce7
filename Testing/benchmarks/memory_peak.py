#!/usr/bin/env python
"""Peak memory of ``medalign screen`` against the voxel bytes of its input, per allocator.

Writes synthetic body-like CTs (int16 NIfTI, like most real CTs) of growing size and
screens each in a child process, once with the command's default allocator settings and
once with ``MEDALIGN_MALLOC=system`` (glibc's defaults); the child's peak RSS comes from
``wait4``.  The ratio peak / voxel bytes of the largest volume, minus the fixed cost of
the smallest, is what ``medalign.core.memory`` uses to refuse volumes that cannot fit.

    python Testing/benchmarks/memory_peak.py [--sizes 64x256x256,256x512x512] [--findings 18]

Not a test: a 256x512x512 volume takes about a minute per run on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
ENGINE = HERE.parents[1] / "SlicerMedAlign"


def _write_volume(shape_kji: tuple[int, int, int], folder: Path, dtype: str = "int16") -> Path:
    from helpers import synthetic_ct

    from medalign.core.volume_io import write_volume

    spacing = (320.0 / shape_kji[2], 320.0 / shape_kji[1], 300.0 / shape_kji[0])
    path = folder / f"ct_{'x'.join(map(str, shape_kji))}.nii.gz"
    volume = synthetic_ct(shape_kji, spacing=spacing)
    volume.array = volume.array.astype(dtype)
    write_volume(volume, path)
    return path


def _screen_peak(path: Path, out: Path, findings: str, malloc: str) -> tuple[float, float, int]:
    """(peak RSS in MB, seconds, exit code) of one ``medalign screen`` child."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MEDALIGN_MALLOC")}
    env["PYTHONPATH"] = os.pathsep.join([str(ENGINE), env.get("PYTHONPATH", "")])
    env["MEDALIGN_MEMORY_CHECK"] = "off"  # measure the run itself, not the guard's verdict
    if malloc == "system":
        env["MEDALIGN_MALLOC"] = "system"
    argv = [sys.executable, "-m", "medalign.cli", "screen", str(path), "--out", str(out), "--device", "cpu"]
    if findings:
        argv += ["--findings", findings]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode:
        print(err[-2000:], file=sys.stderr)
    return usage.ru_maxrss / 1024.0, time.perf_counter() - start, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64x256x256,128x512x512,256x512x512", help="k x j x i, comma-separated")
    parser.add_argument("--findings", default="", help='"A;B" (default: the 18 CT-RATE findings)')
    parser.add_argument("--dtype", default="int16", help="voxel type of the written NIfTI (int16 or float32)")
    parser.add_argument("--malloc", default="tuned,system", help="allocator settings to compare")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medalign-mem-") as tmp:
        folder = Path(tmp)
        print(f"{'shape k x j x i':18s} {'voxel MB':>9s} {'allocator':>9s} {'peak MB':>8s} {'peak/voxel':>10s} {'s':>6s}")
        for text in args.sizes.split(","):
            shape = tuple(int(n) for n in text.lower().split("x"))
            path = _write_volume(shape, folder, args.dtype)  # type: ignore[arg-type]
            voxel_mb = shape[0] * shape[1] * shape[2] * 2 / 2**20  # as int16, whatever the file holds
            for malloc in args.malloc.split(","):
                peak, seconds, code = _screen_peak(path, folder / "out", args.findings, malloc)
                status = "" if code == 0 else f"  exit {code}"
                print(f"{text:18s} {voxel_mb:9.0f} {malloc:>9s} {peak:8.0f} {peak / voxel_mb:10.2f} {seconds:6.0f}{status}",
                      flush=True)
            path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
