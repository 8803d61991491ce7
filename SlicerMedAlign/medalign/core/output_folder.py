"""The output folder of a run: proven writable before any work, locked against a second
run, and the only place a run writes (every name in it is made safe and checked).

Screening a cohort takes hours; an ``--out`` that is a file, read-only or held by another
run must fail in one sentence at the start, not with a traceback at the end, and a case
id or finding name from a CSV must never steer a write outside the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from medalign.core.atomic import TMP_PREFIX, remove_stale
from medalign.core.errors import OutputError

__all__ = ["LOCK_NAME", "case_folder_name", "claim", "inside", "locked", "prepare", "unique_names"]

LOCK_NAME = ".medalign.lock"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME = 96  # well under every file system's 255-byte limit, with room for a hash and suffix


def prepare(out: str | Path) -> Path:
    """Create ``out`` and write a probe file in it; one sentence if either fails."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"The output folder {out} is an existing file; choose a folder for --out.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"Cannot create the output folder {out} ({_reason(exc)}); choose another --out.") from None
    probe = out / f"{TMP_PREFIX}probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"medalign")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"Cannot write in the output folder {out} ({_reason(exc)}); choose a writable --out.") from None
    return out


@contextlib.contextmanager
def locked(out: Path, name: str = LOCK_NAME, clean: bool = True) -> Iterator[Path]:
    """Hold ``out`` for this run (a second run is refused at once, not interleaved) and,
    with ``clean``, remove the temporary files a killed run left in it. torchrun ranks
    share one folder, so each holds its own lock ``name`` and cleans only its cases."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(out / name), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputError(
            f"Another medalign run is writing to {out}; wait for it to finish or choose another --out."
        ) from None
    except OSError as exc:
        raise OutputError(f"Cannot lock the output folder {out} ({_reason(exc)}).") from None
    try:
        if clean:
            remove_stale(out)
        yield out
    finally:
        lock.release()


@contextlib.contextmanager
def claim(out: str | Path, name: str = LOCK_NAME, clean: bool = True) -> Iterator[Path]:
    """``prepare`` then ``locked``: the folder a run writes into. If the run fails, a folder
    it created and left empty is removed again, so a refused input leaves nothing behind."""
    existed = Path(out).expanduser().is_dir()
    path = prepare(out)
    try:
        with locked(path, name, clean):
            yield path
    except BaseException:
        if not existed:
            _remove_if_empty(path, name)
        raise


def _remove_if_empty(folder: Path, lock_name: str) -> None:
    with contextlib.suppress(OSError):
        if [p.name for p in folder.iterdir()] == [lock_name]:
            (folder / lock_name).unlink()
        folder.rmdir()


def inside(root: Path, name: str) -> Path:
    """``root / name``, proven (after resolving links and '..') to lie inside ``root``."""
    base = Path(root).resolve()
    path = (base / name).resolve()
    if path == base or not path.is_relative_to(base):
        raise OutputError(f"Refusing to write {name!r}: it would land outside the output folder {root}.")
    return path


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def case_folder_name(case_id: str) -> str:
    """A case id as a folder name: kept as is when already safe ("1.2.840.1", "ct_01"),
    otherwise its safe characters plus a hash of the id, so distinct ids stay distinct."""
    safe = _UNSAFE.sub("_", case_id).strip("._-")[:_MAX_NAME]
    if safe == case_id:
        return safe
    return f"{safe}-{_short_hash(case_id)}" if safe else f"case-{_short_hash(case_id)}"


def unique_names(names: Iterable[str], base: Callable[[str], str], reserved: Iterable[str] = ()) -> dict[str, str]:
    """One safe file name per name: ``base(name)``, plus a short hash of the name when that
    is empty, or clashes (ignoring case, as macOS and Windows do) with another or a reserved name."""
    bases = {n: base(n)[:_MAX_NAME] for n in names}
    counts = Counter(b.lower() for b in bases.values())
    taken = {r.lower() for r in reserved}
    out = {}
    for name, b in bases.items():
        if not b:
            out[name] = _short_hash(name)
        elif counts[b.lower()] > 1 or b.lower() in taken:
            out[name] = f"{b}-{_short_hash(name)}"
        else:
            out[name] = b
    return out


def _reason(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()
