"""The adapter picker both front ends show: one line about a ``medalign adapt`` file, whether
it fits the chosen model (and the one sentence when it does not), and the adapters in some
folders that do.

The Slicer panel's file picker and the web viewer's adapter list use the same words and the
same rule, so they live here. Only the safetensors header is read
(``medalign.inference.adapter.read_adapter_header``: no torch, no tensor data), so the line
can be rebuilt every time the path or the model changes; whether an adapter fits is the
screening's own rule (``check_registry_model``: the registry's pinned weights SHA-256).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from medalign.core.errors import MedAlignError

ADAPTER_SUFFIX = ".safetensors"
NO_ADAPTER = "No adapter: the model's own (zero-shot) prompts."


@dataclass(frozen=True)
class AdapterChoice:
    """One adapter file as a picker shows it."""

    path: str
    model: str  # the model it was trained for (a registry name when ``registered``)
    registered: bool
    method: str
    shots: int
    findings: tuple[str, ...]
    calibrated: bool  # it carries its own Platt calibration (medalign calibrate --adapter)

    @property
    def label(self) -> str:
        """"site.safetensors — colipri · vip+kmat · 16 shots · 2 findings · calibrated"."""
        parts = [self.model, self.method, _count(self.shots, "shot"), _count(len(self.findings), "finding")]
        return f"{Path(self.path).name} — " + " · ".join([*parts, *(["calibrated"] if self.calibrated else [])])

    @property
    def description(self) -> str:
        """The one line a panel shows under the picker."""
        calibration = "its own calibration" if self.calibrated else "no calibration of its own"
        return (f"Adapter for {self.model} ({self.method}, {_count(self.shots, 'shot')}, {calibration}): "
                f"{', '.join(self.findings)}.")


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def describe_adapter(path: str | Path) -> AdapterChoice:
    """The adapter in ``path`` as a picker shows it; a missing, unreadable or foreign file is
    the engine's one sentence (``CheckpointError``)."""
    from medalign.inference.adapter import read_adapter_header

    adapter = read_adapter_header(path)
    return AdapterChoice(path=str(path), model=adapter.model, registered=adapter.registered, method=adapter.method,
                         shots=adapter.shots, findings=tuple(adapter.findings),
                         calibrated=adapter.calibration is not None and bool(adapter.calibration.findings))


def check_adapter(path: str | Path | None, model: str | None) -> None:
    """Refuse, in the engine's one sentence, an adapter in ``path`` that cannot screen with
    registry model ``model`` (missing, unreadable, not an adapter, other weights); nothing
    when no adapter is chosen. No model named: the one a screening would use (the adapter's
    own when registered, else the default), as ``Screener`` decides."""
    if not path:
        return
    from medalign.inference.adapter import check_registry_model, read_adapter_header
    from medalign.models import registry

    adapter = read_adapter_header(path)
    check_registry_model(adapter, model or (adapter.model if adapter.registered else registry.DEFAULT_MODEL), path)


def adapter_problem(path: str | Path | None, model: str | None) -> str:
    """``check_adapter``'s sentence, or "" when the adapter can screen with ``model``."""
    try:
        check_adapter(path, model)
    except MedAlignError as exc:
        return str(exc)
    return ""


def adapter_status(path: str | Path | None, model: str | None) -> tuple[str, bool]:
    """(the line under the picker, whether Screen may run with it): the adapter's
    description, the sentence that refuses it, or the words for "no adapter"."""
    if not path:
        return NO_ADAPTER, True
    problem = adapter_problem(path, model)
    if problem:
        return problem, False
    return describe_adapter(path).description, True


def adapter_files(locations: Iterable[str | Path]) -> list[Path]:
    """The ``*.safetensors`` files named in ``locations``: a file as itself, a folder by its
    files (not its subfolders), sorted by name; each once, missing ones skipped."""
    seen, out = set(), []
    for location in locations:
        location = Path(location)
        files = sorted(location.glob(f"*{ADAPTER_SUFFIX}")) if location.is_dir() else [location]
        for file in files:
            key = file.resolve()
            if file.is_file() and key not in seen:
                seen.add(key)
                out.append(file)
    return out


def adapters_for_model(locations: Iterable[str | Path], model: str | None) -> list[AdapterChoice]:
    """The adapters among ``locations`` (files and folders) that screening with ``model`` can
    use; files that are not adapters, or belong to other weights, are left out."""
    return [describe_adapter(file) for file in adapter_files(locations) if not adapter_problem(file, model)]


__all__ = ["ADAPTER_SUFFIX", "NO_ADAPTER", "AdapterChoice", "adapter_files", "adapter_problem", "adapter_status",
           "adapters_for_model", "check_adapter", "describe_adapter"]
