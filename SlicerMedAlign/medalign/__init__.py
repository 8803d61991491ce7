"""MedAlign engine: zero-shot CT screening with knowledge-bridged local alignment maps.

The engine never imports slicer, qt, ctk or vtk; it works on NumPy arrays and torch
tensors so the same code serves the CLI, cohorts, the Slicer module and the web viewer.

Layers (data flows down; ``Testing/python/test_layers.py`` enforces it):
``core`` -> ``knowledge``, ``models``, ``inference`` -> ``training``, ``synth``,
``data``, ``evaluation`` -> ``cli``.

The public API below is what the CLI, the MRML glue and the README use. It loads
lazily, so ``import medalign`` stays instant and torch-free until a model is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

from medalign.core.errors import CheckpointError, InputError, MedAlignError
from medalign.core.volume import Volume

__version__ = "0.1.0"

_LAZY = {
    "screen": "medalign.inference.screener",
    "Screener": "medalign.inference.screener",
    "screen_cohort": "medalign.inference.cohort",
    "ScreeningResult": "medalign.inference.results",
    "read_volume": "medalign.core.volume_io",
    "write_volume": "medalign.core.volume_io",
    "list_models": "medalign.models.registry",
    "load_model": "medalign.models",
}
_RENAMED = {"load_model": "load"}

__all__ = ["CheckpointError", "InputError", "MedAlignError", "Volume", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'medalign' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value
