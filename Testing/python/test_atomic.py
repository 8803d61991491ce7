"""One atomic-write helper (``medalign.core.atomic``), used by every writer in the project."""

from __future__ import annotations

import ast
import json
import os
import stat
from pathlib import Path

import pytest

from medalign.core.atomic import TMP_PREFIX, atomic_output, remove_stale, write_json, write_text

SOURCE = Path(__file__).resolve().parents[2] / "SlicerMedAlign"
# Calls that publish a file under its final name: only core/atomic.py may make them.
_RENAMES = {("os", "replace"), ("os", "rename"), ("tempfile", "mkstemp"), ("tempfile", "NamedTemporaryFile")}


def _rename_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        func = node.func if isinstance(node, ast.Call) else None
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and (func.value.id, func.attr) in _RENAMES:
            found.append(f"{path.relative_to(SOURCE)}:{node.lineno} {func.value.id}.{func.attr}")
    return found


def test_atomic_writes_are_implemented_once():
    offenders = [c for p in sorted(SOURCE.rglob("*.py")) if p.name != "atomic.py" for c in _rename_calls(p)]
    assert offenders == [], "write through medalign.core.atomic instead: " + ", ".join(offenders)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = write_text(tmp_path / "results.json", "old\n")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half", encoding="utf-8")
        raise RuntimeError("killed mid-write")
    assert target.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_written_files_have_ordinary_permissions(tmp_path):
    """mkstemp's 0600 made the registry and label files private to one user."""
    umask = os.umask(0o022)
    try:
        path = write_json(tmp_path / "registry.json", {"b": 1, "a": [1, 2]}, sort_keys=True)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_text(encoding="utf-8") == json.dumps({"a": [1, 2], "b": 1}, indent=2) + "\n"


def test_remove_stale_takes_only_temporaries(tmp_path):
    (tmp_path / f"{TMP_PREFIX}abc-results.json").write_text("x")
    (tmp_path / f"{TMP_PREFIX}def-maps").mkdir()
    (tmp_path / "results.json").write_text("{}")
    removed = remove_stale(tmp_path)
    assert len(removed) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
