"""One progress reporter for every long command: a tqdm bar for people, or
``MEDALIGN-PROGRESS <fraction> <message>`` lines for the Slicer module's background process."""

from __future__ import annotations

import sys

PROGRESS_PREFIX = "MEDALIGN-PROGRESS"


def parse_progress_line(line: str) -> tuple[float, str] | None:
    """Inverse of the machine format; None for any other line."""
    parts = line.strip().split(" ", 2)
    if len(parts) < 2 or parts[0] != PROGRESS_PREFIX:
        return None
    try:
        return float(parts[1]), parts[2] if len(parts) > 2 else ""
    except ValueError:
        return None


class ProgressReporter:
    """Callable ``(fraction, message)``; use as a context manager so the bar closes."""

    def __init__(self, desc: str, machine: bool = False) -> None:
        self.machine = machine
        self.desc = desc
        self._bar = None

    def __enter__(self) -> ProgressReporter:
        if not self.machine:
            from tqdm import tqdm

            self._bar = tqdm(total=100, desc=self.desc, unit="%", file=sys.stderr, leave=False,
                             bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}")
        return self

    def __call__(self, fraction: float, message: str) -> None:
        if self.machine:
            print(f"{PROGRESS_PREFIX} {fraction:.4f} {message}", flush=True)
        elif self._bar is not None:
            self._bar.n = int(round(100 * fraction))
            self._bar.set_description_str(f"{self.desc}: {message:<40.40s}", refresh=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
