"""Child processes of a background run: what the run controller needs from one, a
``subprocess`` implementation for tests and scripts, and ending a whole process tree.

The controller never touches Qt: inside Slicer the widget hands it a ``QProcess``
adapter, tests and scripts hand it ``PopenProcess``. Both report the same four events
(stdout bytes, stderr bytes, finished, failed to start) and give the child's pid, so
cancelling works the same way for both: by pid, on the whole tree.

Why the whole tree: inside Slicer the child is started through ``PythonSlicer``, a CTK
launcher that starts the real Python as *its* child (commontk/AppLauncher@dcb7a7e
Base/ctkAppLauncher.cpp:713 ``this->Process.start(...)``) and passes no signal on, so
killing the launcher's pid leaves the screening running (the same note in
lassoan/SlicerMONAIAuto3DSeg@9cdf2df MONAIAuto3DSegLib/process.py:106, which kills
``children(recursive=True)`` at :109-110).
"""

from __future__ import annotations

import contextlib
import queue
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Protocol

POLL_S = 0.05


class ProcessEvents(Protocol):
    """What a child process reports, in the order it happens, on the caller's thread."""

    def on_stdout(self, data: bytes) -> None: ...

    def on_stderr(self, data: bytes) -> None: ...

    def on_finished(self, exit_code: int, crashed: bool) -> None: ...

    def on_failed_to_start(self, reason: str) -> None: ...


class ChildProcess(Protocol):
    """One child process as the run controller drives it.

    ``start`` reports a program that cannot start through ``on_failed_to_start`` (then
    ``on_finished`` never comes, as with Qt's ``errorOccurred(FailedToStart)``), either
    during ``start`` or later. ``wait_finished`` delivers pending events and returns True
    once ``on_finished`` (or the start failure) has been delivered.
    """

    def start(self, argv: Sequence[str], env: dict[str, str], events: ProcessEvents) -> None: ...

    def pid(self) -> int | None: ...

    def wait_finished(self, timeout_s: float) -> bool: ...


class PopenProcess:
    """``ChildProcess`` on ``subprocess.Popen``: two reader threads fill a queue and
    ``pump``/``wait_finished`` deliver it on the calling thread, as Qt's event loop does
    for ``QProcess``. A test or script calls ``pump`` where Slicer would run its event loop."""

    def __init__(self) -> None:
        self._popen: subprocess.Popen | None = None
        self._events: ProcessEvents | None = None
        self._queue: queue.Queue = queue.Queue()
        self._open_streams = 0
        self._exited_at: float | None = None
        self._done = False

    def start(self, argv: Sequence[str], env: dict[str, str], events: ProcessEvents) -> None:
        self._events = events
        try:
            self._popen = subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE)
        except OSError as exc:
            self._done = True
            events.on_failed_to_start(exc.strerror or str(exc))
            return
        for stream, kind in ((self._popen.stdout, "stdout"), (self._popen.stderr, "stderr")):
            self._open_streams += 1
            threading.Thread(target=self._read, args=(stream, kind), daemon=True).start()

    def _read(self, stream, kind: str) -> None:
        for chunk in iter(lambda: stream.read1(65536), b""):
            self._queue.put((kind, chunk))
        self._queue.put((kind, None))

    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None and not self._done else None

    def pump(self, timeout_s: float = 0.0) -> bool:
        """Deliver the output that arrived (waiting up to ``timeout_s`` for more) and, once
        the child has exited, ``on_finished``. True once finished."""
        deadline = time.monotonic() + timeout_s
        while not self._done:
            try:
                kind, chunk = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                kind, chunk = None, None
            if kind is not None:
                self._deliver(kind, chunk)
            if self._popen.poll() is not None:
                self._exited_at = self._exited_at or time.monotonic()
                # Output still in the pipes is read first; an orphaned grandchild that keeps
                # them open must not hold the end back (QProcess does not wait for it either).
                if self._open_streams == 0 or time.monotonic() - self._exited_at > 0.5:
                    self._finish()
                    break
            if time.monotonic() >= deadline and kind is None:
                break
        return self._done

    def _deliver(self, kind: str, chunk: bytes | None) -> None:
        if chunk is None:
            self._open_streams -= 1
        elif kind == "stdout":
            self._events.on_stdout(chunk)
        else:
            self._events.on_stderr(chunk)

    def _finish(self) -> None:
        while True:
            try:
                self._deliver(*self._queue.get_nowait())
            except queue.Empty:
                break
        self._done = True
        code = self._popen.returncode
        self._events.on_finished(code, code < 0)

    def wait_finished(self, timeout_s: float) -> bool:
        return self.pump(timeout_s)


def end_process_tree(pid: int, timeout_s: float = 5.0) -> list[int]:
    """Terminate ``pid`` and every process below it, kill what is still there after
    ``timeout_s``, and return the pids that were signalled.

    The tree is frozen (suspended) before it is listed: once a launcher dies its children
    are re-parented and no longer listed under it, and a running parent could start a new
    one between the listing and the signal. A process counts as gone when it no longer
    exists or is a zombie; reaping the direct child is left to its owner (``Popen`` or
    ``QProcess``), which needs the exit status.
    """
    import psutil  # installed with the module's dependencies; not needed to import MedAlignLib

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    tree = [root]
    _signal(root, "suspend")
    with contextlib.suppress(psutil.NoSuchProcess):
        tree += root.children(recursive=True)
    for process in tree[1:]:
        _signal(process, "suspend")
    for process in tree:
        _signal(process, "terminate")
    for process in tree:
        _signal(process, "resume")  # a stopped process acts on SIGTERM only once continued
    alive = _wait_gone(tree, timeout_s)
    for process in alive:
        _signal(process, "kill")
    _wait_gone(alive, timeout_s)
    return [process.pid for process in tree]


def _signal(process, action: str) -> None:
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
        getattr(process, action)()


def _wait_gone(processes: list, timeout_s: float) -> list:
    """Poll (without reaping) until each process is gone or a zombie; return the others."""
    import psutil

    deadline = time.monotonic() + timeout_s
    alive = list(processes)
    while alive:
        still = []
        for process in alive:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    still.append(process)
            except psutil.NoSuchProcess:
                pass
        alive = still
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    return alive
