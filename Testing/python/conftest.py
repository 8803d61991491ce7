"""Shared test fixtures: where ../shared lives, and skips with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("MEDALIGN_SHARED", REPO.parent / "shared"))


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
