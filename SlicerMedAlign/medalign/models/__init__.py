"""Model families and the one entry point that builds a ready-to-screen model.

``load(name, weights=PATH, text_encoder=PATH_OR_NONE)`` is the one factory: a model's
spec (``resources/models/<name>/model.json``, ``models.spec``) or the user's registration
says where weights and text encoder come from, ``FAMILY_LOADERS`` which code builds it.  Families are imported lazily so that ``medalign
models list`` stays fast and a broken optional family never blocks the others.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from medalign.models.registry import FAMILY_LOADERS  # the one family list

if TYPE_CHECKING:
    from medalign.models.base import ImageFeatures, ScreeningModel

_LAZY = {"ImageFeatures", "ScreeningModel"}  # from models.base, which imports torch


def __getattr__(name: str):
    """``ImageFeatures`` and ``ScreeningModel`` on first use: importing torch costs seconds,
    and ``medalign models list/download`` (the panels' background download) needs no torch."""
    if name in _LAZY:
        from medalign.models import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def family_loader(family: str):
    try:
        target = FAMILY_LOADERS[family]
    except KeyError:
        known = ", ".join(sorted(FAMILY_LOADERS))
        from medalign.core.errors import CheckpointError

        raise CheckpointError(f"Unknown model family '{family}' (known: {known}).") from None
    module_name, func = target.split(":")
    return getattr(importlib.import_module(module_name), func)


def load(
    name: str,
    weights: str | Path | None = None,
    text_encoder: str | Path | None = None,
    device: str = "cpu",
) -> ScreeningModel:
    """Build registry model ``name`` (or family ``name``) with verified weights, in eval mode."""
    from medalign.models import registry

    entry = registry.get(name)
    weights_path = Path(weights) if weights is not None else registry.resolve_weights(entry)
    text_encoder = text_encoder if text_encoder is not None else registry.resolve_text_encoder(entry)
    model = family_loader(entry.family)(weights_path, text_encoder, device)
    stored = registry.load_calibration(entry.name)
    if stored is not None:  # fitted on the user's own labelled data: wins over the checkpoint's
        model.calibration = model.calibration.merged(stored)
    return model.eval()


__all__ = ["ImageFeatures", "ScreeningModel", "FAMILY_LOADERS", "family_loader", "load"]
