"""Run the published models' own packages (``colipri``, ``merlin-vlm``) as the parity judge.

The official packages live in their OWN virtual environment, never in the one under
test: both reach ``torchvision`` (COLIPRI through ``timm``, Merlin for its ResNet-152
definition), and on a CPU-only PyTorch the only ``torchvision`` wheel for torch 2.13 on
PyPI is CUDA-linked. Installed beside the product, that broken ``torchvision`` makes
``transformers`` fail to import ``BertModel``, i.e. it would break the very install the
tests are meant to check. So a test writes a small script, runs it with the reference
environment's Python in a child process, and compares the tensors it saves.

The reference environment is created on first use (``python -m venv
--system-site-packages`` plus ``pip install colipri merlin-vlm`` at pinned versions and
the running torch's version, from PyPI) under ``$MEDALIGN_REFERENCE_ENV`` or
``~/.cache/medalign/reference-env``. Inside it, :data:`PRELUDE` declares the two
``torchvision`` operators its Python code registers fake kernels for
(``torchvision::nms``, ``torchvision::qnms``), so the pure-Python parts import; the
reference code never calls them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

PACKAGES = {"colipri": "colipri==0.1.3", "merlin": "merlin-vlm==0.0.7"}

PRELUDE = textwrap.dedent(
    """
    import importlib.util
    import torch

    def _declare_missing_torchvision_ops():
        if importlib.util.find_spec("torchvision") is None:
            return None
        try:
            import torchvision  # noqa: F401  a working build needs nothing
            return None
        except RuntimeError:
            library = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                library.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            return library

    _TORCHVISION_OPS = _declare_missing_torchvision_ops()  # kept alive: the schemas live with it
    """
)


def reference_env_dir() -> Path:
    env = os.environ.get("MEDALIGN_REFERENCE_ENV")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medalign" / "reference-env"


def _python(env_dir: Path) -> Path:
    return env_dir / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def _marker(env_dir: Path) -> Path:
    return env_dir / "medalign-reference.json"


def _wanted() -> dict:
    return {"packages": sorted(PACKAGES.values()), "torch": torch.__version__.split("+")[0]}


def _ready(env_dir: Path) -> bool:
    try:
        return json.loads(_marker(env_dir).read_text()) == _wanted() and _python(env_dir).is_file()
    except (OSError, ValueError):
        return False


def reference_python() -> Path:
    """The reference environment's Python, creating the environment once (about a minute)."""
    env_dir = reference_env_dir()
    if not _ready(env_dir):
        from filelock import FileLock

        env_dir.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(env_dir) + ".lock"):
            if not _ready(env_dir):
                _create(env_dir)
    return _python(env_dir)


def _remove_leftover(env_dir: Path) -> None:
    """Clear whatever an earlier, unfinished set-up left at ``env_dir``: a half-made
    environment, a file, or a symlink whose target is gone (``venv --clear`` trips over
    a dangling link with "File exists", since it only clears paths that resolve)."""
    if env_dir.is_symlink() or env_dir.is_file():
        env_dir.unlink()
    elif env_dir.is_dir():
        shutil.rmtree(env_dir)


def _create(env_dir: Path) -> None:
    _remove_leftover(env_dir)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(env_dir)], check=True)
    torch_pin = f"torch=={_wanted()['torch']}"  # keep the system's torch; never pull another
    install = [str(_python(env_dir)), "-m", "pip", "install", "-q", *PACKAGES.values(), torch_pin]
    done = subprocess.run(install, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot install the reference packages from PyPI ({done.stderr.strip()[-300:]})")
    _marker(env_dir).write_text(json.dumps(_wanted()))


def run_reference(script: str, *args: str | os.PathLike, timeout: float = 600) -> str:
    """Run ``script`` (Python source) in the reference environment with :data:`PRELUDE`
    first; returns its stdout, fails the test with its stderr tail on error."""
    python = reference_python()
    source = PRELUDE + "\n" + textwrap.dedent(script)
    env = {**os.environ, "PYTHONUTF8": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [str(python), "-c", source, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )
    if done.returncode != 0:
        pytest.fail(f"the reference script failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout
