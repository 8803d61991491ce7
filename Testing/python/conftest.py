"""Shared test fixtures: where ../shared lives, skips with a reason when it is absent, and a
registered tiny model for the command-line tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def shared_root(env: str | None) -> Path:
    """The shared folder (holding ``data/`` and ``fixtures/``). ``MEDALIGN_SHARED`` may name
    it or its ``data`` folder, as the README once said: a folder with ``real_ct`` in it is
    the data folder, so its parent is the shared root (else ~106 tests skipped silently)."""
    if not env:
        return REPO.parent / "shared"
    path = Path(env).expanduser()
    return path.parent if (path / "real_ct").is_dir() else path


SHARED = shared_root(os.environ.get("MEDALIGN_SHARED"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the project's ../shared folder, or set MEDALIGN_SHARED); absent here")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real CTs and reports)."""
    return _need(SHARED / "data")


@pytest.fixture(scope="session")
def real_ct(shared_data: Path) -> Path:
    return _need(shared_data / "real_ct")


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """../shared/fixtures (parity numbers from the public CT-CLIP and BrgSA code)."""
    return _need(SHARED / "fixtures")


@pytest.fixture()
def tiny_model(tmp_path, monkeypatch) -> str:
    """A tiny checkpoint registered as model 'tiny' in a private MEDALIGN_HOME."""
    from helpers import tiny_checkpoint

    from medalign.cli import main
    from medalign.inference import screener as screening
    from medalign.models.download import sha256_file

    monkeypatch.setenv("MEDALIGN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEDALIGN_OFFLINE", "1")
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")
    assert main(["models", "add", "tiny", "--weights", str(ckpt), "--sha256", sha256_file(ckpt)]) == 0
    screening._MODEL_CACHE.clear()
    return "tiny"


@pytest.fixture()
def ct_file(tmp_path) -> Path:
    from helpers import synthetic_ct

    from medalign.core.volume_io import write_volume

    return write_volume(synthetic_ct(), tmp_path / "ct.nii.gz")
