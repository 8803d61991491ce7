"""Atomic file writes: the one place that writes a temporary file and renames it into place.

Every output of the engine (results, maps, checkpoints, registry, labels, phantoms) goes
through here so readers -- a second torchrun rank, the Slicer module polling a folder, a
rerun after a kill -- never see half a file. Temporary names start with ``TMP_PREFIX`` so
a later run can recognise and remove what a killed run left behind (``remove_stale``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from medalign.core.errors import MedAlignError

__all__ = ["TMP_PREFIX", "atomic_output", "publish", "remove_stale", "replace_folder", "temp_name", "write_json", "write_text"]

TMP_PREFIX = ".tmp-"


def temp_name(path: Path) -> Path:
    """A unique name beside ``path`` that keeps its suffixes (writers choose formats by them)."""
    return path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}"


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only on success.

    The temporary file lives in the same folder, so ``os.replace`` is atomic; it is created
    by the caller's writer with ordinary permissions (not mkstemp's 0600), and a failed or
    cancelled write removes it (file or folder) and leaves ``path`` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        if not tmp.exists():
            raise MedAlignError(f"Nothing was written for {path.name}.")
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically, flushed to disk before the rename."""
    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def write_json(path: str | Path, data: object, sort_keys: bool = False) -> Path:
    """Write ``data`` as indented JSON (one trailing newline), atomically."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys, default=float) + "\n")


def publish(part: str | Path, path: str | Path) -> Path:
    """Move a finished file written under its own temporary name (a resumable download's
    ``.part``) into place: synced first, so a crash cannot publish a file of zeros."""
    part, path = Path(part), Path(path)
    with open(part, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(part, path)
    return path


def remove_stale(folder: str | Path) -> list[Path]:
    """Remove the temporary files and folders a killed run left directly in ``folder``.

    Only call this while holding the folder's lock: a running writer's temp files look the same.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]
    for p in stale:
        _remove(p)
    return stale


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def replace_folder(new: Path | None, path: str | Path) -> None:
    """Put the finished folder ``new`` at ``path`` (``None``: just remove ``path``).

    A folder cannot be renamed over a full one, so the old folder is first renamed aside
    (a temporary name, removed here or by the next run's ``remove_stale``): at every
    moment ``path`` is either the whole old folder, absent, or the whole new one.
    """
    path = Path(path)
    old = temp_name(path) if path.exists() else None
    if old is not None:
        os.replace(path, old)
    try:
        if new is not None:
            os.replace(new, path)
    finally:
        if old is not None:
            _remove(old)
