"""Where the engine's packaged resources (knowledge YAML, model specs and weights) live."""

from __future__ import annotations

from pathlib import Path


def resources_dir() -> Path:
    """The ``resources`` folder of the installed package (wheel, checkout or Slicer module alike)."""
    return Path(__file__).resolve().parents[1] / "resources"
