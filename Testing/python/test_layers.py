"""The engine's layers: data flows down, never back up.

``core`` -> ``knowledge`` -> ``models`` -> ``inference`` -> ``training``/``synth``/``data``/
``evaluation`` -> ``cli``. Inference and models never import training, synthetic data
or cohort code, so the Slicer module and a screening server ship only what screening
needs. (That the engine never imports Slicer, Qt or VTK is
``test_module_packaging``'s.)
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "SlicerMedAlign"
ENGINE = SOURCE / "medalign"

_LOW = ("core", "knowledge", "models", "inference")
_RESEARCH = ("training", "synth", "data", "evaluation")
ALLOWED = {
    "core": {"core"},
    "knowledge": {"core", "knowledge"},
    "models": {"core", "knowledge", "models"},
    "inference": set(_LOW),
    **{layer: set(_LOW + _RESEARCH) for layer in _RESEARCH},
    "cli": set(_LOW + _RESEARCH + ("cli",)),
}
FOREIGN_TO_ENGINE = ("slicer", "qt", "ctk", "vtk", "MedAlignLib", "trame", "trame_slicer")


def layer_of(module: str) -> str | None:
    """``medalign.inference.screener`` -> ``inference``; the package top counts as core."""
    parts = module.split(".")
    if parts[0] != "medalign":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "core"


def imported_modules(source: str, module: str) -> list[str]:
    """Every module a source file imports, at any depth (function-level imports too)."""
    package = module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found += [f"{name}.{alias.name}" for alias in node.names] if not node.module else [name]
    return found


def layer_violations(path: Path, source: str | None = None) -> list[str]:
    rel = path.relative_to(SOURCE).with_suffix("")
    module = ".".join(p for p in rel.parts if p != "__init__")
    own = layer_of(module)
    text = path.read_text(encoding="utf-8") if source is None else source
    bad = []
    for target in imported_modules(text, module if path.name != "__init__.py" else module + ".__init__"):
        top = target.split(".")[0]
        if top in FOREIGN_TO_ENGINE:
            bad.append(f"{module} imports {target} (the engine never imports Slicer, Qt or VTK)")
        to = layer_of(target)
        if to and to not in ALLOWED[own]:
            bad.append(f"{module} ({own}) imports {target} ({to})")
    return bad


def engine_files() -> list[Path]:
    return sorted(ENGINE.rglob("*.py"))


def test_every_engine_module_sits_in_a_known_layer():
    assert {p.relative_to(ENGINE).parts[0] for p in engine_files() if len(p.relative_to(ENGINE).parts) > 1} <= set(ALLOWED)
    assert [p.name for p in ENGINE.glob("*.py")] == ["__init__.py"], "engine modules live inside a layer package"


def test_imports_flow_down_the_layers():
    violations = [v for path in engine_files() for v in layer_violations(path)]
    assert violations == []


def test_an_inference_module_importing_training_is_caught():
    fake = ENGINE / "inference" / "screener.py"
    for source in (
        "from medalign.training.loop import train\n",
        "def f():\n    from medalign.synth import phantoms\n",
        "from ..data.cohorts import load_cohort\n",
        "import slicer\n",
    ):
        assert layer_violations(fake, source), source



_TEST_BUILDER = re.compile(r"(^|_)(tiny|fake|dummy|mock|stub)(_|$)|for_tests?$|^test_")


def test_engine_holds_no_test_builders():
    """Builders that only tests use (tiny models, fakes) live in Testing/python/helpers.py,
    not in the product an installation ships."""
    found = [
        f"{path.relative_to(SOURCE)}:{node.name}"
        for path in engine_files()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and _TEST_BUILDER.search(node.name)
    ]
    assert found == []
