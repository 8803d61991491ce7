"""The torch commands re-run themselves once with glibc's allocator tuned (medalign.core.allocator)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from medalign.core import allocator

ENGINE = Path(__file__).resolve().parents[2] / "SlicerMedAlign"
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc allocator settings apply on Linux with glibc only")


@needs_glibc
def test_tuned_environment_adds_the_tunables_and_keeps_the_rest():
    env = allocator.tuned_environment({"PATH": "/bin", "RANK": "3"})
    assert env == {"PATH": "/bin", "RANK": "3", "GLIBC_TUNABLES": allocator.GLIBC_TUNABLES}


def test_tuned_environment_respects_the_user_and_other_platforms(monkeypatch):
    assert allocator.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) is None
    assert allocator.tuned_environment({"MEDALIGN_MALLOC": "System"}) is None
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator.tuned_environment({}) is None


def _run_cli(tmp_path: Path, extra_env: dict[str, str], command: str = "train") -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `python -m medalign.cli train --data MISSING` (or `screen MISSING`); a sitecustomize
    records GLIBC_TUNABLES as every Python process of the run starts."""
    record = tmp_path / "record.txt"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        f"with open({str(record)!r}, 'a') as f:\n"
        "    f.write(os.environ.get('GLIBC_TUNABLES', '-') + '\\n')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MEDALIGN_MALLOC")}
    env["PYTHONPATH"] = os.pathsep.join([str(hook), str(ENGINE), env.get("PYTHONPATH", "")])
    env.update(extra_env)
    missing = str(tmp_path / "missing")
    args = ["train", "--data", missing, "--out", str(tmp_path / "m.safetensors")] if command == "train" else [
        "screen", missing, "--out", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, "-m", "medalign.cli", *args], env=env, capture_output=True, text=True, timeout=120)
    return proc, record.read_text().split()


@needs_glibc
def test_command_line_reruns_itself_once_with_the_tuned_allocator(tmp_path):
    proc, starts = _run_cli(tmp_path, {})
    assert starts == ["-", allocator.GLIBC_TUNABLES]  # the command, then its one re-run
    assert proc.returncode == 2
    assert proc.stderr.count("is not a cohort folder") == 1  # the error is printed once, by the re-run


def test_opting_out_runs_the_command_as_it_is(tmp_path):
    proc, starts = _run_cli(tmp_path, {"MEDALIGN_MALLOC": "system"})
    assert starts == ["-"]
    assert proc.returncode == 2 and "is not a cohort folder" in proc.stderr


def test_screening_runs_with_glibc_defaults(tmp_path):
    """The tuned allocator raised screening's peak memory (2.9 vs 2.1 GB on 256x512x512)
    without making it faster, so screen (and batch, eval) never re-run with it."""
    proc, starts = _run_cli(tmp_path, {}, command="screen")
    assert starts == ["-"]
    assert proc.returncode == 2 and proc.stderr.count("does not exist") == 1
