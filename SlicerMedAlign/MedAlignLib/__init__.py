"""MRML glue between Slicer scenes and the ``medalign`` engine.

Imports only what slicer-core also provides (``vtkMRML*`` classes from ``slicer``,
``vtk``), never ``qt`` or ``slicer.util``, so it runs inside Slicer and headless
(trame-slicer / slicer-core) alike. Heavy engine parts (torch) load on first use.
"""

from .adapter_choices import AdapterChoice, adapter_problem, adapter_status, adapters_for_model, describe_adapter
from .anatomy import ANATOMY_NODE_TYPES, anatomy_for_report, segmentation_from_node
from .background import BackgroundDownload, BackgroundScreening
from .colors import COLOR_NODE_NAME, ensure_color_node, find_color_node, inferno_rgb
from .dependencies import REQUIREMENTS, dependency_problems, missing_dependencies, pip_requirements, plan_install
from .logic import TABLE_COLUMNS, ScreeningLogic, is_medalign_map, register_node_classes, threshold_value
from .model_choices import ModelChoice, download_question, model_choice, model_choices, needs_download
from .nodes import node_from_volume, volume_from_node
from .processes import PopenProcess, end_process_tree
from .report import describe_location, export_report, export_summary
from .results_view import (
    DisplayController,
    finding_at_view_row,
    first_screenable_volume,
    hidden_input_ids,
    is_screenable_volume,
)
from .run_controller import BusyError, RunController, RunOutcome, RunState

__all__ = [
    "AdapterChoice",
    "ANATOMY_NODE_TYPES",
    "BackgroundDownload",
    "BackgroundScreening",
    "BusyError",
    "COLOR_NODE_NAME",
    "DisplayController",
    "ModelChoice",
    "PopenProcess",
    "REQUIREMENTS",
    "RunController",
    "RunOutcome",
    "RunState",
    "ScreeningLogic",
    "TABLE_COLUMNS",
    "adapter_problem",
    "adapter_status",
    "adapters_for_model",
    "anatomy_for_report",
    "dependency_problems",
    "describe_adapter",
    "describe_location",
    "download_question",
    "end_process_tree",
    "ensure_color_node",
    "export_report",
    "export_summary",
    "find_color_node",
    "finding_at_view_row",
    "first_screenable_volume",
    "hidden_input_ids",
    "inferno_rgb",
    "is_medalign_map",
    "is_screenable_volume",
    "missing_dependencies",
    "model_choice",
    "model_choices",
    "needs_download",
    "node_from_volume",
    "pip_requirements",
    "plan_install",
    "register_node_classes",
    "segmentation_from_node",
    "threshold_value",
    "volume_from_node",
]
