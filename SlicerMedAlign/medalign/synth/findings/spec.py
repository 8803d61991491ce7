"""What the phantom builder needs of each finding: how to paint it and how to report it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from medalign.synth.painting import PaintContext

#: ``term(k)``: the finding's name or one of its first ``k`` synonyms (one random draw).
Term = Callable[..., str]
#: Paints the finding onto the context's anatomy, sets its mask bit, returns report facts.
Painter = Callable[[PaintContext], dict[str, Any]]
#: The positive report sentence(s) from those facts.
Reporter = Callable[[np.random.Generator, dict[str, Any], Term], str]


@dataclass(frozen=True)
class FindingSpec:
    """A finding's painter beside its report sentence.

    ``paint`` is None for findings that are part of the anatomy itself (an enlarged heart,
    pericardial fluid: ``findings.heart``), which the lungs must be drawn around."""

    name: str
    paint: Painter | None
    report: Reporter
