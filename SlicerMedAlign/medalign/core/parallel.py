"""Process-parallel map for the CPU-bound data steps (phantom generation, preprocessing).

Results come back in input order, so a dataset built with 16 workers is byte-identical to
one built with 1.  Workers are spawned (not forked): a fork taken while PyTorch's thread
pool is alive can hang, and each worker runs single-threaded so N workers use N cores.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from medalign.core.errors import InputError, MedAlignError


def default_workers() -> int:
    """Every core this process may use (respects CPU affinity, e.g. in containers)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS/Windows
        return max(1, os.cpu_count() or 1)


def _single_threaded() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int | None = None) -> Iterator[Any]:
    """``map(fn, items)`` over ``workers`` processes (default: all cores), in order.

    ``fn`` must be a module-level function.  One worker (or one item) runs in this
    process, which keeps tracebacks plain and tests fast.
    """
    items = list(items)
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise InputError(f"The number of workers must be at least 1, not {workers}.")
    if workers == 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=mp.get_context("spawn"),
                                 initializer=_single_threaded) as pool:
            yield from pool.map(fn, items, chunksize=1)
    except BrokenProcessPool:
        raise MedAlignError(
            "A worker process died (out of memory, or a script without an `if __name__ == \"__main__\":` guard "
            "re-ran itself in each worker); retry with workers=1 (--workers 1)."
        ) from None
