"""The results panel without Qt: which finding a table row is, which volumes the CT selector
offers, and an overlay that follows the parameter node.

The Qt widget only forwards events here, so every rule of the panel runs headless on a
real slicer-core scene. Why the overlay follows the parameter node rather than the
sliders' signals: a slider's ``valueChanged`` reaches a slot connected in ``setup()``
before the parameterNodeWrapper's own connector (connected later by ``connectGui``;
Slicer v5.8.1 ``parameterNodeWrapper/guiConnectors.py:338-339``) has written the value,
so a slot reading the parameter node there sees the previous value. The node's
ModifiedEvent comes after the write (``wrapper.py:172-178``: the write sits in a
``NodeModify`` block), so reading there always sees the new value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import vtk

from medalign.core.errors import MedAlignError

from .logic import ScreeningLogic, is_medalign_map
from .scene_queries import nodes_of_class

# Parameter names of MedAlign.py's ``MedAlignParameterNode`` (the wrapper stores a float as
# str(value), a str as is and a node as a reference of the same name: Slicer v5.8.1
# ``parameterNodeWrapper/serializers.py:257-261, 295-299, 402-409``).
OPACITY = "opacity"
THRESHOLD = "threshold"
SHOWN_FINDING = "shownFinding"
RESULT_TABLE = "resultTable"
DEFAULT_OPACITY = 0.5
DEFAULT_THRESHOLD = 0.5

ReportFn = Callable[[str], None]


# ---------------------------------------------------------------------- table rows
def table_row_of_view_row(table, view_row: int) -> int | None:
    """MRML row shown in row ``view_row`` of a qMRMLTableView's model, None for none.

    Without ``UseColumnTitleAsColumnHeader`` the view's row 0 holds the column names and
    every data row sits one lower (Slicer v5.8.1 ``qMRMLTableModel.cxx:637-652``,
    ``mrmlTableRowIndex``); results tables MedAlign makes set the flag, tables of older
    saved scenes may not.
    """
    if table is None or view_row is None or view_row < 0:
        return None
    row = view_row if table.GetUseColumnTitleAsColumnHeader() else view_row - 1
    return row if 0 <= row < table.GetNumberOfRows() else None


def finding_at_view_row(table, view_row: int) -> str | None:
    """Finding name in row ``view_row`` of the results table view (None: header row or none)."""
    row = table_row_of_view_row(table, view_row)
    return table.GetCellText(row, 0) if row is not None else None


# ---------------------------------------------------------------------- CT selector
def is_screenable_volume(node) -> bool:
    """Volumes the CT selector offers: scalar volumes other than MedAlign's own maps."""
    return node is not None and node.IsA("vtkMRMLScalarVolumeNode") and not is_medalign_map(node)


def hidden_input_ids(scene) -> list[str]:
    """IDs of scalar volumes the CT selector must hide (for qMRMLSortFilterProxyModel's
    ``hiddenNodeIDs``: qMRMLNodeComboBox's ``addAttribute`` can only require an attribute,
    not exclude one; Slicer v5.8.1 ``qMRMLNodeComboBox.h:134-146``,
    ``qMRMLSortFilterProxyModel.h:96-100``)."""
    return [node.GetID() for node in nodes_of_class(scene, "vtkMRMLScalarVolumeNode") if not is_screenable_volume(node)]


def first_screenable_volume(scene):
    """The first volume the CT selector offers (None when there is none)."""
    return next((node for node in nodes_of_class(scene, "vtkMRMLScalarVolumeNode") if is_screenable_volume(node)), None)


# ---------------------------------------------------------------------- overlay
@dataclass(frozen=True)
class DisplayState:
    """What the overlay shows, as the parameter node says."""

    table_id: str | None
    finding: str
    opacity: float
    threshold: float


def _number(parameter_node, name: str, default: float) -> float:
    text = parameter_node.GetParameter(name)
    try:
        return float(text) if text else default
    except ValueError:
        return default


def display_state(parameter_node) -> DisplayState:
    """The overlay's state read from the raw parameter node (as the wrapper stores it)."""
    table = parameter_node.GetNodeReference(RESULT_TABLE)
    return DisplayState(
        table_id=table.GetID() if table is not None else None,
        finding=parameter_node.GetParameter(SHOWN_FINDING) or "",
        opacity=_number(parameter_node, OPACITY, DEFAULT_OPACITY),
        threshold=_number(parameter_node, THRESHOLD, DEFAULT_THRESHOLD),
    )


class DisplayController:
    """Keeps the slice views' overlay equal to the parameter node's display state.

    It observes the node's ModifiedEvent and applies a state once: a state that failed
    (a deleted map node, say) is reported once through ``report`` and not retried until
    the state changes, so a failure can never turn into a dialog on every event.
    """

    def __init__(self, logic: ScreeningLogic, parameter_node, report: ReportFn) -> None:
        self.logic = logic
        self.parameter_node = parameter_node
        self.report = report
        # What the views show now is left alone until the state changes or ``show`` is called.
        self._applied: DisplayState | None = display_state(parameter_node)
        self._tag = parameter_node.AddObserver(vtk.vtkCommand.ModifiedEvent, self._on_modified)

    def close(self) -> None:
        """Stop following the parameter node (the widget calls this on exit)."""
        if self._tag is not None:
            self.parameter_node.RemoveObserver(self._tag)
            self._tag = None

    def _on_modified(self, caller=None, event=None) -> None:
        self.apply()

    def show(self, finding: str) -> None:
        """Show ``finding`` (a table row was chosen), even when it is already the shown one."""
        self._applied = None
        self.parameter_node.SetParameter(SHOWN_FINDING, finding or "")
        self.apply()  # no ModifiedEvent when the finding was already the shown one

    def apply(self):
        """Show the parameter node's state if it is not the one shown; returns the map node or None."""
        state = display_state(self.parameter_node)
        if state == self._applied:
            return None
        self._applied = state
        table = self.parameter_node.GetNodeReference(RESULT_TABLE)
        if table is None or not state.finding:
            return None
        try:
            return self.logic.show_map(state.finding, opacity=state.opacity, threshold=state.threshold, table=table)
        except MedAlignError as exc:
            self.report(str(exc))
            return None
