"""Small wording helpers of the phantom reports: a random choice among phrasings, a side,
a finding's name or synonym."""

from __future__ import annotations

import numpy as np


def pick(rng: np.random.Generator, items: list[str] | tuple[str, ...]) -> str:
    """One of ``items``, drawn with ``rng`` (one draw, whatever the length)."""
    return items[int(rng.integers(len(items)))]


def sides_phrase(sides: list[str]) -> str:
    """"bilateral" when both sides are listed, else the one side."""
    return "bilateral" if len(set(sides)) > 1 else sides[0]


def term(rng: np.random.Generator, kb: dict, name: str, k: int = 2) -> str:
    """The finding's name or one of its first synonyms (varied wording)."""
    options = [name] + list(kb[name].synonyms[:k]) if name in kb else [name]
    return pick(rng, options).lower()
