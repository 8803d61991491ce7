"""A cohort's next cases read (and, for a CPU model, prepared) by data-loader workers.

Decoding a CT (gzip, DICOM) and preprocessing it take longer than the demo model's
encoding, so with ``workers`` > 0 a ``torch.utils.data.DataLoader`` reads and prepares
the next cases in other processes while this one screens the current case. Cases come
back in cohort order, one at a time; a case that cannot be read or prepared comes back
with its error sentence instead of stopping the loader (the batch records it and goes
on). Workers are spawned, not forked, as in ``core.parallel`` (a fork taken while
PyTorch's thread pool is alive can hang), and each runs single-threaded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medalign.core.errors import MedAlignError
from medalign.core.volume import Volume
from medalign.inference.preprocess import PreparedImage
from medalign.models.profiles import PreprocessProfile

__all__ = ["LoadedCase", "loaded_cases", "error_sentence"]


@dataclass
class LoadedCase:
    """One case as the loader hands it over: its volume (and prepared input), or its error."""

    case: Any  # cohort.CohortCase
    volume: Volume | None = None
    prepared: PreparedImage | None = None
    error: str | None = None


def error_sentence(exc: BaseException) -> str:
    """A case's failure as one line: the engine's own sentence, else the exception's type and text."""
    if isinstance(exc, MedAlignError):
        return str(exc)
    return " ".join(f"{type(exc).__name__}: {exc}".split())


class _Cases(Dataset):
    """Item n: case n read, checked and (with a profile) prepared on the CPU."""

    def __init__(self, cases: Sequence[Any], profile: PreprocessProfile | None, shared: bool) -> None:
        self.cases, self.profile, self.shared = list(cases), profile, shared

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, n: int) -> LoadedCase:
        from medalign.core.volume_io import read_volume
        from medalign.inference.input_checks import check_ct
        from medalign.inference.preprocess import prepare

        case = self.cases[n]
        try:
            volume = read_volume(case.path)
            prepared = None
            if self.profile is not None:
                check_ct(volume)  # an MR or a mask fails here, before seconds of preprocessing
                prepared = prepare(volume, self.profile, device="cpu")
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 -- one unreadable case must not end the loader
            return LoadedCase(case, error=error_sentence(exc))
        if self.shared:  # a tensor crosses to the main process through shared memory, an array is pickled
            volume.array = torch.from_numpy(np.ascontiguousarray(volume.array))
        return LoadedCase(case, volume, prepared)


def _as_is(item: LoadedCase) -> LoadedCase:
    return item


def loaded_cases(cases: Sequence[Any], profile: PreprocessProfile | None, workers: int) -> Iterator[LoadedCase]:
    """``cases`` loaded in order; ``workers`` processes work ahead (0: each case when it is due, here).

    ``profile`` None: the workers only read (a GPU model prepares faster on its own device).
    """
    if workers <= 0 or len(cases) == 0:
        data = _Cases(cases, profile, shared=False)
        yield from (data[n] for n in range(len(data)))
        return
    loader = DataLoader(_Cases(cases, profile, shared=True), batch_size=None, collate_fn=_as_is,
                        num_workers=min(workers, len(cases)), prefetch_factor=1, multiprocessing_context="spawn")
    for item in loader:
        if item.volume is not None:
            item.volume.array = item.volume.array.numpy()
        yield item
