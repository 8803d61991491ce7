"""MedAlign engine: zero-shot CT screening with knowledge-bridged local alignment maps.

The engine never imports slicer, qt, ctk or vtk; it works on NumPy arrays and torch
tensors so the same code serves the CLI, batch jobs, the Slicer module and the web viewer.
"""

__version__ = "0.1.0"

from .errors import MedAlignError, InputError, CheckpointError  # noqa: E402,F401
from .volume import Volume  # noqa: E402,F401
