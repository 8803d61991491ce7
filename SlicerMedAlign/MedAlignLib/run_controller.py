"""The life of one background run of the panel, without Qt: start, progress, cancel, end.

Every decision the Slicer panel makes about a run lives here, so it is tested headless
on real slicer-core scenes and real child processes; ``MedAlign.py`` only binds Qt
signals to it. A run is a job executed by a ``ChildProcess`` (``QProcess`` adapter in
Slicer, ``PopenProcess`` elsewhere): a ``BackgroundScreening`` or a ``BackgroundDownload``
of a model's weights, one at a time, through the same progress bar and Cancel. Whatever
happens to a screening (success,
bad input, a crash, a cancel, a program that does not start, the scene closed or the
input node removed mid-run) the controller ends idle, the work folder is gone and
either all result nodes exist or none.
"""

from __future__ import annotations

import codecs
import contextlib
import enum
import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from medalign.core.errors import CancelledError, InputError, MedAlignError

from .adapter_choices import check_adapter
from .background import BackgroundDownload, BackgroundJob, BackgroundScreening
from .model_choices import needs_download
from .processes import ChildProcess, end_process_tree

logger = logging.getLogger("MedAlign")

STDERR_LINES_KEPT = 200
CANCEL_TIMEOUT_S = 10.0


class RunState(enum.Enum):
    IDLE = "idle"
    INSTALLING = "installing"  # Python packages are being installed (Slicer 5.8's pip keeps the GUI live)
    RUNNING = "running"
    CANCELLING = "cancelling"


class BusyError(MedAlignError):
    """A start or an install was asked for while the panel is busy with another one."""


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended. ``status``: "done", "cancelled" or "failed"; ``message``: one
    sentence for the status line; ``show_finding``: the finding to overlay now ("" when
    the panel is not shown: a run that ends while the user is elsewhere must not rewire
    their slice views); ``kind``: "screening" or "download" (after a download the model
    list is shown again: its status changed); ``model``: the downloaded model's name."""

    status: str
    message: str
    table: Any = None
    show_finding: str = ""
    kind: str = "screening"
    model: str = ""


ProgressFn = Callable[[float, str], None]


class RunController:
    """Start, follow and end background runs (screenings and model downloads, one at a
    time) for one scene's ``ScreeningLogic``.

    ``new_process`` makes a fresh ``ChildProcess`` per run; ``on_progress(fraction,
    message)``, ``on_state(RunState)`` and ``on_done(RunOutcome)`` report back to the UI;
    ``panel_active()`` says whether the panel is on screen when a run ends.
    """

    def __init__(self, logic, new_process: Callable[[], ChildProcess], *, on_progress: ProgressFn | None = None,
                 on_state: Callable[[RunState], None] | None = None,
                 on_done: Callable[[RunOutcome], None] | None = None,
                 panel_active: Callable[[], bool] = lambda: True, python: str | None = None,
                 cancel_timeout_s: float = CANCEL_TIMEOUT_S) -> None:
        self.logic = logic
        self.new_process = new_process
        self.on_progress = on_progress or (lambda fraction, message: None)
        self.on_state = on_state or (lambda state: None)
        self.on_done = on_done or (lambda outcome: None)
        self.panel_active = panel_active
        self.python = python
        self.cancel_timeout_s = cancel_timeout_s
        self.state = RunState.IDLE
        self.job: BackgroundJob | None = None
        self.process: ChildProcess | None = None
        self.last_outcome: RunOutcome | None = None
        self._run = 0  # numbers runs: events of an abandoned process are ignored
        self._cancel_reason: str | None = None
        self._stderr: deque[str] = deque(maxlen=STDERR_LINES_KEPT)
        self._decoders: dict[str, Any] = {}
        self._stderr_pending = ""
        self._scene = None
        self._scene_tags: list[int] = []

    # ------------------------------------------------------------------ state
    @property
    def busy(self) -> bool:
        return self.state is not RunState.IDLE

    @property
    def running(self) -> bool:
        return self.state in (RunState.RUNNING, RunState.CANCELLING)

    @property
    def downloading(self) -> bool:
        """A model download runs (the panels keep Screen disabled and offer Cancel)."""
        return self.running and self.job is not None and self.job.kind == BackgroundDownload.kind

    def _set_state(self, state: RunState) -> None:
        self.state = state
        self.on_state(state)

    def _refuse_if_busy(self) -> None:
        if self.state is RunState.INSTALLING:
            raise BusyError("MedAlign's Python packages are being installed; wait for the installation to finish.")
        if self.downloading:
            raise BusyError(f"Model '{self.job.model}' is being downloaded; wait for the download to finish "
                            "or press Cancel first.")
        if self.busy:
            raise BusyError("A screening is already running; press Cancel to stop it first.")

    @contextlib.contextmanager
    def installing(self) -> Iterator[None]:
        """Hold the INSTALLING state while packages install: a second click (Slicer 5.8's
        ``logProcessOutput`` calls ``processEvents``, v5.8.1 Base/Python/slicer/util.py:3852)
        is refused instead of starting a second pip."""
        self._refuse_if_busy()
        self._set_state(RunState.INSTALLING)
        try:
            yield
        finally:
            self._set_state(RunState.IDLE)

    # ------------------------------------------------------------------ start
    def start(self, volume_node, findings, model: str | None = None, device: str = "auto",
              adapter: str | None = None) -> None:
        """Write the hand-off volume and start the child; returns at once (events follow).
        ``adapter``: a ``medalign adapt`` file (empty or None: none); one that cannot screen
        with ``model`` (unreadable, or trained on other weights) is refused here in the
        engine's one sentence, from its header alone, before any child starts.

        A model whose weights are not downloaded is refused: the panels ask before a
        download (``start_download``), a screening never starts one unasked."""
        self._refuse_if_busy()
        if volume_node is None:
            raise InputError("Select a CT volume to screen.")
        check_adapter(adapter, model)
        if needs_download(model):
            raise InputError(f"Model '{model}' is not downloaded yet; download it first (choose it in the model "
                             "list and confirm the download).")
        self._launch(BackgroundScreening(volume_node, findings=findings, model=model or None, device=device,
                                         python=self.python, adapter=adapter or None))

    def start_download(self, model: str) -> None:
        """Download (or resume) and verify ``model``'s weights in a child process; returns at
        once. Progress, Cancel (the partial file stays for a later resume) and the outcome
        sentence go through the same callbacks as a screening's."""
        from medalign.models import registry

        self._refuse_if_busy()
        if not model:
            raise InputError("Choose a model to download.")
        registry.get(model)  # an unknown name is one sentence here, not a child that fails
        self._launch(BackgroundDownload(model, python=self.python))

    def _launch(self, job: BackgroundJob) -> None:
        try:
            argv, env = job.command(), job.environment()
        except BaseException:
            job.cleanup()
            raise
        self._begin(job)
        run = self._run
        try:
            self.process = self.new_process()
            self.process.start(argv, env, _RunEvents(self, run))
        except BaseException:
            if self._run == run:
                self._end(RunOutcome("failed", f"The {job.what} process could not be started."))
            raise

    def _begin(self, job: BackgroundJob) -> None:
        self._run += 1
        self.job = job
        self._cancel_reason = None
        self._stderr.clear()
        self._stderr_pending = ""
        self._decoders = {kind: codecs.getincrementaldecoder("utf-8")(errors="replace") for kind in ("out", "err")}
        self._observe_scene(job.volume_node)
        self._set_state(RunState.RUNNING)
        self.on_progress(0.0, "Starting...")

    # ------------------------------------------------------------------ events of the child
    def _stdout(self, data: bytes) -> None:
        for fraction, message in self.job.feed(self._decoders["out"].decode(data)):
            self.on_progress(fraction, message)

    def _stderr_data(self, data: bytes, final: bool = False) -> None:
        *lines, self._stderr_pending = (self._stderr_pending + self._decoders["err"].decode(data, final)).split("\n")
        if final and self._stderr_pending:
            lines, self._stderr_pending = [*lines, self._stderr_pending], ""
        for line in lines:
            line = line.rstrip("\r")
            self._stderr.append(line)
            if line.strip():
                logger.info("%s process: %s", self.job.what if self.job is not None else "background", line)

    def _failed_to_start(self, reason: str) -> None:
        what = self.job.what if self.job is not None else "screening"
        program = self.job.python if self.job is not None else "the screening program"
        self._end(RunOutcome("failed", f"Could not start the {what} process {program}: {reason.rstrip('.')}."))

    def _finished(self, exit_code: int, crashed: bool) -> None:
        self._unobserve_scene()
        self._stdout(b"\n")  # a last progress line without its newline still counts
        self._stderr_data(b"", final=True)
        stderr = "\n".join(self._stderr)
        try:
            result = self.job.finish(exit_code, stderr, self.logic, cancelled=self._cancel_reason is not None,
                                     crashed=crashed)
        except CancelledError as exc:
            outcome = RunOutcome("cancelled", self._cancel_reason or str(exc))
        except MedAlignError as exc:
            outcome = RunOutcome("failed", str(exc))
        except Exception as exc:  # loading the results broke: still end idle, say it, keep the trace in the log
            logger.exception("MedAlign: finishing the %s failed", self.job.what)
            outcome = RunOutcome("failed", f"{self._finishing_words()} failed: {exc}")
        else:
            outcome = RunOutcome("done", result) if self.job.kind == BackgroundDownload.kind else self._success(result)
        self._end(outcome)

    def _finishing_words(self) -> str:
        return "Checking the download" if self.job.kind == BackgroundDownload.kind else "Loading the screening results"

    def _success(self, table) -> RunOutcome:
        rows = table.GetNumberOfRows()
        warnings = self.logic.result_from_table(table, load_maps=False).warnings
        top = self.logic.finding_at_row(table, 0) if rows else ""
        message = " ".join([f"Screened {rows} findings.", *warnings])
        return RunOutcome("done", message, table, top if self.panel_active() else "")

    def _end(self, outcome: RunOutcome) -> None:
        """Back to idle whatever happened: observers off, work folder gone, outcome out."""
        self._unobserve_scene()
        if self.job is not None:
            self.job.cleanup()
            outcome = replace(outcome, kind=self.job.kind, model=getattr(self.job, "model", None) or "")
        self.job, self.process, self._cancel_reason = None, None, None
        self._run += 1
        self.last_outcome = outcome
        self._set_state(RunState.IDLE)
        self.on_done(outcome)

    # ------------------------------------------------------------------ cancel
    def cancel(self, reason: str | None = None) -> bool:
        """End the child's whole process tree and wait for it; False when nothing ran.

        ``reason`` is the outcome's sentence (default: the job's own, e.g. "Screening was
        cancelled; nothing was created."). Returns with the controller idle: if the child
        does not report its end within ``cancel_timeout_s`` the run is closed anyway and
        its late events are ignored.
        """
        if self.state is not RunState.RUNNING:
            return False
        self._cancel_reason = reason or self.job.cancelled_message
        self._set_state(RunState.CANCELLING)
        run, process = self._run, self.process
        pid = process.pid() if process is not None else None
        if pid:
            end_process_tree(pid, timeout_s=self.cancel_timeout_s / 2)
        if process is not None:
            process.wait_finished(self.cancel_timeout_s / 2)
        if self._run == run:  # no end reported: close the run ourselves
            self._end(RunOutcome("cancelled", reason))
        return True

    def wait(self, timeout_s: float) -> bool:
        """Block until the current run ends (for scripts and tests); True when idle."""
        if self.running and self.process is not None:
            self.process.wait_finished(timeout_s)
        return not self.running

    # ------------------------------------------------------------------ scene
    def _observe_scene(self, node) -> None:
        scene = node.GetScene() if node is not None else None
        if scene is None:
            return
        self._scene = scene

        def on_removed(caller, event) -> None:
            if self.state is RunState.RUNNING and not scene.IsNodePresent(node):
                self.cancel("The input volume was removed; screening was cancelled and nothing was created.")

        def on_close(caller, event) -> None:
            self.cancel("The scene was closed; screening was cancelled and nothing was created.")

        self._scene_tags = [scene.AddObserver(scene.NodeRemovedEvent, on_removed),
                            scene.AddObserver(scene.StartCloseEvent, on_close)]

    def _unobserve_scene(self) -> None:
        for tag in self._scene_tags:
            self._scene.RemoveObserver(tag)
        self._scene_tags = []


class _RunEvents:
    """Forwards one run's process events to the controller while that run is current."""

    def __init__(self, controller: RunController, run: int) -> None:
        self.controller, self.run = controller, run

    def _current(self) -> bool:
        return self.controller._run == self.run

    def on_stdout(self, data: bytes) -> None:
        if self._current():
            self.controller._stdout(data)

    def on_stderr(self, data: bytes) -> None:
        if self._current():
            self.controller._stderr_data(data)

    def on_finished(self, exit_code: int, crashed: bool) -> None:
        if self._current():
            self.controller._finished(exit_code, crashed)

    def on_failed_to_start(self, reason: str) -> None:
        if self._current():
            self.controller._failed_to_start(reason)
