"""Cohort screening: every CT of a folder or CSV into its own results folder under one output folder.

Hours of work, so the rules are strict: the cohort is listed and checked (unique case
ids) and the output folder proven writable and locked before the first case; a case
done earlier with the same model, findings and maps setting is skipped (an interrupted
run resumes), one done with other settings is redone; a failing case is recorded and the
rest go on; nothing is ever written outside the output folder.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medalign.core.errors import CancelledError, InputError, MedAlignError

SUMMARY_COLUMNS = ["id", "path", "folder", "status", "error", "warnings", "top_finding", "top_probability"]
STATUSES = ("screened", "skipped", "failed")  # skipped: already done earlier with the same settings


@dataclass(frozen=True)
class CohortCase:
    case_id: str
    path: Path


@dataclass
class CohortSummary:
    """What happened to each case of this process's share of the cohort."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None  # the summary CSV

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)

    def line(self) -> str:
        return (f"{self.count('screened')} screened, {self.count('skipped')} skipped (already done), "
                f"{self.count('failed')} failed")


def list_cases(source: str | Path) -> list[CohortCase]:
    """The cases of a folder (CT files and DICOM sub-folders) or a CSV (column 'path',
    optional 'id'); refuses duplicate case ids before any work."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        cases = _cases_from_csv(source)
    elif source.is_dir():
        cases = _cases_from_folder(source)
    else:
        raise InputError(f"{source} is neither a folder nor a CSV file.")
    dups = sorted(i for i, n in Counter(c.case_id for c in cases).items() if n > 1)
    if dups:
        shown = ", ".join(repr(d) for d in dups[:5]) + (" ..." if len(dups) > 5 else "")
        raise InputError(f"The cohort {source} names {len(dups)} case id(s) more than once ({shown}); "
                         "give every case a unique id (a CSV 'id' column) so no result overwrites another.")
    return cases


def _cases_from_csv(source: Path) -> list[CohortCase]:
    from medalign.core.volume_io import strip_volume_suffix

    try:
        with source.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{source} is not a readable UTF-8 CSV ({type(exc).__name__}).") from None
    if not rows or "path" not in rows[0]:
        raise InputError(f"{source} needs a 'path' column listing the CT files or DICOM folders.")
    cases = []
    for n, row in enumerate(rows, start=2):
        text = (row.get("path") or "").strip()
        if not text:
            raise InputError(f"{source} line {n} has an empty 'path'.")
        path = Path(text).expanduser()
        path = path if path.is_absolute() else source.parent / path
        case_id = (row.get("id") or "").strip() or strip_volume_suffix(path.name)
        cases.append(CohortCase(case_id, path))
    return cases


def _cases_from_folder(source: Path) -> list[CohortCase]:
    from medalign.core.volume_io import VOLUME_SUFFIXES, strip_volume_suffix

    def is_case(p: Path) -> bool:
        if p.name.startswith("."):
            return False
        return p.name.lower().endswith(VOLUME_SUFFIXES) if p.is_file() else p.is_dir() and any(p.iterdir())

    cases = [CohortCase(strip_volume_suffix(p.name), p) for p in sorted(source.iterdir()) if is_case(p)]
    if not cases:
        raise InputError(f"{source} holds no CT files or DICOM folders.")
    return cases


def run_settings(model_name: str, findings: Sequence[str], with_maps: bool, adapter: str | Path | None = None) -> dict[str, Any]:
    """What a case's results depend on: results made with other settings are not reused
    (an adapter by its file's SHA-256, so a re-trained adapter at the same path counts as new)."""
    settings: dict[str, Any] = {"model": model_name, "findings": list(findings), "maps": bool(with_maps)}
    if adapter is not None:
        from medalign.models.download import sha256_file

        settings["adapter"] = {"path": str(adapter), "sha256": sha256_file(Path(adapter))}
    return settings


def done_earlier(folder: Path, case: CohortCase, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The stored results of ``case`` if they are complete and made with ``settings``."""
    from medalign.inference.results import RESULTS_JSON

    try:
        data = json.loads((folder / RESULTS_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("settings") != settings:
        return None
    if (data.get("input") or {}).get("case_id") != case.case_id:
        return None
    return data


def screen_cohort(
    source: str | Path,
    out: str | Path,
    model: Any = None,
    findings: str | Sequence[str] | None = None,
    device: str = "auto",
    precision: str = "auto",
    with_maps: bool = True,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    adapter: str | Path | None = None,
    workers: int = 0,
) -> CohortSummary:
    """Screen this process's share (``rank`` of ``world``) of a cohort into ``out``/<case>/
    and write ``summary.csv`` (``summary.rank<r>.csv`` under torchrun).

    ``workers`` > 0: that many data-loader processes read (and, on a CPU, prepare) the next
    cases while this process screens (``cohort_loader``); the results are the same.
    """
    from medalign.core.output_folder import LOCK_NAME, case_folder_name, claim, unique_names
    from medalign.inference.cohort_loader import loaded_cases
    from medalign.inference.screener import Screener

    if workers < 0:
        raise InputError(f"The number of workers must be 0 or more, not {workers}.")
    cases = list_cases(source)
    summary_name = "summary.csv" if world == 1 else rank_summary_name(rank)
    folders = unique_names([c.case_id for c in cases], case_folder_name,
                           reserved=["summary", "summary.csv", *(rank_summary_name(r) for r in range(world))])
    lock = LOCK_NAME if world == 1 else f"{LOCK_NAME}.rank{rank}"
    with claim(out, lock, clean=world == 1) as out:
        screener = Screener(model=model, findings=findings, device=device, precision=precision, adapter=adapter)
        settings = run_settings(screener.model_name, screener.findings, with_maps, adapter)
        share = cases[rank::world]
        rows = {c.case_id: _skipped(c, out, folders[c.case_id], settings) for c in share}
        todo = [c for c in share if rows[c.case_id] is None]
        summary = CohortSummary([r for r in rows.values() if r is not None])
        # a GPU model prepares faster on its own device: there the workers only read
        profile = screener.model.profile if screener.device.type == "cpu" else None
        for loaded in _progress(loaded_cases(todo, profile, workers), len(todo), summary, rank, world, progress):
            rows[loaded.case.case_id] = _screen_case(screener, loaded, out, folders[loaded.case.case_id], settings)
            summary.rows.append(rows[loaded.case.case_id])
        summary.rows = [rows[c.case_id] for c in share]  # cohort order
        summary.path = _write_summary(out / summary_name, summary.rows)
    return summary


def _progress(items, total: int, summary: CohortSummary, rank: int, world: int, enabled: bool):
    """The items, under a bar with rate, ETA and the running counts (skipped cases are not in the total)."""
    import sys

    from tqdm import tqdm

    bar = tqdm(items, total=total, desc=f"batch (rank {rank}/{world})" if world > 1 else "batch", unit="ct",
               file=sys.stderr, disable=not enabled, dynamic_ncols=True,
               bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
    bar.set_postfix_str(summary.line(), refresh=False)
    for item in bar:
        yield item
        bar.set_postfix_str(summary.line(), refresh=False)


def _row(case: CohortCase, folder_name: str) -> dict[str, Any]:
    return {"id": case.case_id, "path": str(case.path), "folder": folder_name}


def _skipped(case: CohortCase, out: Path, folder_name: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The summary row of a case done earlier with the same settings, else None (to screen)."""
    from medalign.core.output_folder import inside

    try:
        earlier = done_earlier(inside(out, folder_name), case, settings)
    except MedAlignError:  # the screening records it
        return None
    return None if earlier is None else _row(case, folder_name) | {"status": "skipped"} | _top(earlier)


def _screen_case(screener, loaded, out: Path, folder_name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """One loaded case, never raising for the case's own faults: the row says what happened."""
    from medalign.core.atomic import remove_stale
    from medalign.core.output_folder import inside
    from medalign.inference.cohort_loader import error_sentence

    case = loaded.case
    row = _row(case, folder_name)
    if loaded.error is not None:
        return row | {"status": "failed", "error": loaded.error}
    try:
        folder = inside(out, folder_name)
        remove_stale(folder)  # what a killed run left (we hold the lock)
        result = screener(loaded.volume, with_maps=settings["maps"], prepared=loaded.prepared)
        result.input.update(path=str(case.path), case_id=case.case_id)
        result.settings = settings
        result.write(folder)
        return row | {"status": "screened"} | _top(result.to_dict())
    except (CancelledError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 -- one case's unexpected fault must not end hours of work
        return row | {"status": "failed", "error": error_sentence(exc)}


def rank_summary_name(rank: int) -> str:
    return f"summary.rank{rank}.csv"


def merge_summaries(source: str | Path, out: str | Path, world: int) -> CohortSummary:
    """Rank 0, after every rank is done: the ranks' summaries as one ``summary.csv`` in
    cohort order (the rank files are removed once it is written)."""
    out = Path(out)
    rows: dict[str, dict[str, Any]] = {}
    for rank in range(world):
        with (out / rank_summary_name(rank)).open(encoding="utf-8", newline="") as fh:
            rows.update((r["id"], r) for r in csv.DictReader(fh))
    ordered = [rows[c.case_id] for c in list_cases(source) if c.case_id in rows]
    summary = CohortSummary(ordered, _write_summary(out / "summary.csv", ordered))
    for rank in range(world):
        (out / rank_summary_name(rank)).unlink(missing_ok=True)
    return summary


def _top(data: dict[str, Any]) -> dict[str, Any]:
    findings = data.get("findings") or []
    top = max(findings, key=lambda f: f.get("probability", 0.0), default=None)
    return {
        "warnings": " | ".join(data.get("warnings") or []),
        "top_finding": "" if top is None else top["name"],
        "top_probability": "" if top is None else round(float(top["probability"]), 4),
    }


def _write_summary(path: Path, rows: list[dict[str, Any]]) -> Path:
    from medalign.core.atomic import write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())
