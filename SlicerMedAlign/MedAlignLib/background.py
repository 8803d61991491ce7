"""Work in a separate process, so the Slicer panel stays responsive and can be killed.

A background job is deliberately just three things: an argv list (plus the environment)
for a ``medalign ... --progress-lines`` command, a parser for the progress lines it
prints, and a ``finish`` that turns its end into a result or one sentence. Two jobs share
that surface, so ``RunController`` runs either: ``BackgroundScreening`` (``medalign
screen``; its results folder becomes nodes) and ``BackgroundDownload`` (``medalign models
download``: a model's weights from the Hub, resumable). The Slicer widget runs the argv
with ``qt.QProcess``; tests, scripts and the web viewer with ``subprocess.Popen``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from medalign.core.errors import CancelledError, MedAlignError
from medalign.core.progress import PROGRESS_PREFIX, parse_progress_line

from .nodes import volume_from_node

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 130


def _engine_root() -> Path:
    """Folder that contains the ``medalign`` package (the module folder inside Slicer)."""
    import medalign

    return Path(medalign.__file__).resolve().parent.parent


def default_python() -> str:
    """The interpreter for the child: this one, unless it is the Slicer application binary
    itself (then Slicer's ``PythonSlicer``, which has the same packages)."""
    exe = Path(sys.executable)
    if exe.name.lower().startswith("slicer"):
        return shutil.which("PythonSlicer") or str(exe.with_name("PythonSlicer"))
    return sys.executable


class BackgroundJob:
    """What every background job shares: the child's environment, its progress lines and
    the sentence for a child that failed. ``kind`` names the job for the run controller
    ("screening" or "download"), ``what`` names its process in sentences."""

    kind = "job"
    what = "background"
    cancelled_message = "The background process was cancelled."
    volume_node = None  # the node the job works on (the controller watches it), if any

    def __init__(self, python: str | None = None) -> None:
        self.python = python or default_python()
        self.fraction = 0.0
        self.message = ""
        self._pending = ""

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for the child: the engine's folder first on PYTHONPATH, unbuffered UTF-8
        output (``PYTHONUTF8``: a finding or path with non-ASCII letters must not turn into a
        UnicodeEncodeError on a Windows code page)."""
        env = dict(os.environ if base is None else base)
        root = str(_engine_root())
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
        env["PYTHONPATH"] = os.pathsep.join([root] + paths)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONUTF8"] = "1"
        return env

    # ------------------------------------------------------------------ progress
    @staticmethod
    def parse_line(line: str) -> tuple[float, str] | None:
        """``MEDALIGN-PROGRESS <fraction> <message>`` -> (fraction, message); None for other lines."""
        return parse_progress_line(line)

    def feed(self, text: str) -> list[tuple[float, str]]:
        """Progress updates found in a chunk of stdout (partial lines are kept for the next chunk)."""
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        updates = []
        for line in lines:
            parsed = self.parse_line(line.rstrip("\r"))
            if parsed is not None:
                self.fraction, self.message = parsed
                updates.append(parsed)
        return updates

    # ------------------------------------------------------------------ finishing
    @classmethod
    def error_message(cls, stderr: str) -> str:
        """The child's one-line reason (``medalign: error: <sentence>``), or its last line."""
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        for line in reversed(lines):
            if line.startswith("medalign: error:"):
                return line[len("medalign: error:"):].strip()
        return lines[-1] if lines else f"The {cls.what} process failed without a message."

    @staticmethod
    def stderr_tail(stderr: str, lines: int = 3) -> str:
        """The last non-empty lines of the child's stderr, joined with ' | ' (for one sentence)."""
        kept = [line.strip() for line in stderr.splitlines() if line.strip()][-lines:]
        return " | ".join(kept) if kept else "no message on stderr"

    def failure_message(self, exit_code: int, stderr: str, crashed: bool = False) -> str:
        """One sentence for a child that did not succeed: its own reason when it gave one
        (``medalign: error:``, exit 2), else how it ended plus the tail of its stderr."""
        if crashed or exit_code < 0:
            how = "crashed or was killed" + (f" (signal {-exit_code})" if exit_code < 0 else "")
            return f"The {self.what} process {how}: {self.stderr_tail(stderr)}."
        if "medalign: error:" in stderr:
            return self.error_message(stderr)
        return f"The {self.what} process failed (exit code {exit_code}): {self.stderr_tail(stderr)}."

    def cleanup(self) -> None:
        """Remove what the job left on disk (nothing, unless a job says otherwise)."""


class BackgroundScreening(BackgroundJob):
    """One background screening job of a volume node.

    ``command()`` writes the node (a copy, via ``volume_from_node``) to ``<work>/input.nrrd``
    and returns the argv; ``feed(text)`` turns stdout chunks into ``(fraction, message)``
    progress updates; ``finish(exit_code, stderr, logic)`` creates the result nodes, or
    raises ``CancelledError`` / ``MedAlignError`` with the child's one-line reason. The work
    folder is removed by ``finish``/``cleanup``, whatever the outcome.
    """

    kind = "screening"
    what = "screening"
    cancelled_message = "Screening was cancelled; nothing was created."

    def __init__(
        self,
        volumeNode,
        findings: Sequence[str] | str | None = None,
        model: str | None = None,
        device: str = "auto",
        python: str | None = None,
        work_dir: str | Path | None = None,
        adapter: str | Path | None = None,
    ) -> None:
        super().__init__(python)
        self.volume_node = volumeNode
        self.findings = findings
        self.model = model
        self.device = device
        self.adapter = adapter  # a medalign adapt file; the child reads, checks and applies it
        self.work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="medalign-"))
        self.input_path = self.work_dir / "input.nrrd"
        self.out_dir = self.work_dir / "results"

    # ------------------------------------------------------------------ launching
    def findings_argument(self) -> str | None:
        if self.findings is None:
            return None
        items = [self.findings] if isinstance(self.findings, str) else list(self.findings)
        for item in items:
            if ";" in item:
                raise MedAlignError(f"A finding name cannot contain ';' ('{item}').")
        return ";".join(s.strip() for s in items if s.strip()) or None

    def command(self) -> list[str]:
        """Write the input and return the argv of ``medalign screen`` (module form, no console script needed)."""
        from medalign.core.volume_io import write_volume

        if not self.input_path.exists():
            # Raw, not gzip: this runs on the GUI thread and the child reads the file once.
            write_volume(volume_from_node(self.volume_node), self.input_path, compress=False)
        argv = [self.python, "-m", "medalign.cli", "screen", str(self.input_path), "--out", str(self.out_dir),
                "--device", self.device, "--progress-lines"]
        if self.model:
            argv += ["--model", str(self.model)]
        findings = self.findings_argument()
        if findings:
            argv += ["--findings", findings]
        if self.adapter:
            argv += ["--adapter", str(self.adapter)]
        return argv

    def finish(self, exit_code: int, stderr: str, logic, cancelled: bool = False, crashed: bool = False):
        """Load the results into ``logic`` (a ``ScreeningLogic``) and return the results table node.

        ``cancelled`` says the user asked for the end; a child killed by anyone else (the
        out-of-memory killer sends SIGKILL too) is a crash, reported with its stderr tail.
        """
        try:
            if cancelled or exit_code == EXIT_CANCELLED:
                raise CancelledError(self.cancelled_message)
            if crashed or exit_code != EXIT_OK:
                raise MedAlignError(self.failure_message(exit_code, stderr, crashed))
            params = {"device": self.device}
            if self.model:
                params["model"] = self.model
            if self.adapter:
                params["adapter"] = str(self.adapter)
            return logic.load_results(self.out_dir, self.volume_node, parameters=params)
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)


class BackgroundDownload(BackgroundJob):
    """Download (or resume) and verify a model's weights and text encoder in a child process.

    ``medalign models download NAME --progress-lines`` does the work: hash-checked,
    resumable across processes (a cancelled child leaves its ``.part`` file, which the next
    download continues with an HTTP Range request). ``finish`` returns the outcome's
    sentence, or raises ``CancelledError`` / ``MedAlignError`` with the child's reason.
    Nothing is written outside the Hub cache and the registry folder, so there is no work
    folder to clean up.
    """

    kind = "download"
    what = "download"

    def __init__(self, model: str, python: str | None = None) -> None:
        super().__init__(python)
        self.model = model
        self.cancelled_message = (f"The download of model '{model}' was cancelled; what was fetched is kept "
                                  "and the next download continues from there.")

    def command(self) -> list[str]:
        """The argv of ``medalign models download`` (module form, no console script needed)."""
        return [self.python, "-m", "medalign.cli", "models", "download", self.model, "--progress-lines"]

    def finish(self, exit_code: int, stderr: str, logic=None, cancelled: bool = False, crashed: bool = False) -> str:
        """The sentence for a download that ended well (the weights are on disk and their
        hashes were checked by the child); raises for a cancelled or failed one."""
        from medalign.models import registry

        if cancelled or exit_code == EXIT_CANCELLED:
            raise CancelledError(self.cancelled_message)
        if crashed or exit_code != EXIT_OK:
            raise MedAlignError(self.failure_message(exit_code, stderr, crashed))
        status = registry.weights_status(registry.get(self.model))
        if status not in ("downloaded", "local"):
            raise MedAlignError(f"The download process of model '{self.model}' ended, but its weights are {status}.")
        return f"Model '{self.model}' is downloaded and verified."


__all__ = ["BackgroundDownload", "BackgroundJob", "BackgroundScreening", "PROGRESS_PREFIX", "EXIT_OK", "EXIT_BAD_INPUT",
           "EXIT_CANCELLED", "default_python"]
