"""Screening results as MRML nodes: a ranked table, one coloured map per finding, segments.

``ScreeningLogic`` is everything the Slicer panel, the Python console and the web viewer
do with a scene; it imports only what slicer-core also provides (``vtkMRML*``, ``vtk``),
so the same code runs inside Slicer and headless in tests. Results are stored on the
nodes themselves (attributes and node references) so they survive scene save and load,
and node creation is all-or-nothing: a failed or cancelled run leaves the scene as it was.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import vtk

from medalign.core.errors import CancelledError, InputError
from medalign.inference.results import MIN_FLAG_AUC

from .colors import build_color_node, find_color_node
from .nodes import image_data_from_array, node_from_volume, numpy_to_matrix, volume_from_node
from .scene_queries import nodes_of_class

if TYPE_CHECKING:  # the engine's result types pull in nothing heavy, but keep import time minimal
    from medalign.inference.results import FindingResult, ScreeningResult

# Attribute / reference names (stable: saved scenes depend on them).
ROLE = "MedAlign.Role"  # "results" | "map" | "segmentation"
RESULT_JSON = "MedAlign.Result"  # ScreeningResult.to_dict() as JSON, on the table node
PARAMETERS_JSON = "MedAlign.Parameters"  # what was asked for (model, findings, device)
FINDING = "MedAlign.Finding"  # on map nodes
HOTSPOT_JSON = "MedAlign.Hotspot"  # on map nodes
REF_INPUT = "MedAlign.Input"
REF_MAP = "MedAlign.Map"
REF_RESULTS = "MedAlign.Results"
REF_SEGMENTATION = "MedAlign.Segmentation"

TABLE_COLUMNS = (
    "finding", "probability", "uncertainty", "flag", "held-out AUC", "hotspot R", "hotspot A", "hotspot S", "extent_mm3",
)
SEGMENT_COLOR = (0.99, 0.65, 0.04)  # inferno's orange: matches the map's bright end

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]


class ScreeningLogic:
    """Screen volume nodes and manage the resulting nodes of one MRML scene."""

    def __init__(self, scene) -> None:
        self.scene = scene
        register_node_classes(scene)
        self.last_table = None  # results table node of the latest run in this scene

    # ------------------------------------------------------------------ screening
    def screen(
        self,
        volumeNode,
        findings: Sequence[str] | str | None = None,
        model=None,
        device: str = "auto",
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
        adapter: str | Path | None = None,
    ) -> ScreeningResult:
        """Screen ``volumeNode`` in this process and add the result nodes (see ``add_result``).

        The node is copied before the engine sees it, so it is never modified. Raises
        ``CancelledError`` (scene unchanged) when ``cancel()`` returns True. ``adapter``: a
        ``medalign adapt`` file, as the panel's Adapter row (its model when ``model`` is not
        given; one trained for other weights is refused in one sentence before any work).
        """
        from medalign.inference.screener import screen as engine_screen

        if is_medalign_map(volumeNode):
            raise InputError(
                f"'{volumeNode.GetName()}' is a MedAlign alignment map, not a CT; pick the CT it was computed from."
            )
        volume = volume_from_node(volumeNode)
        result = engine_screen(volume, findings=findings, model=model, device=device, progress=progress, cancel=cancel,
                               adapter=adapter or None)
        parameters = {
            "model": result.model,
            "findings": [f.name for f in result.findings],
            "device": device,
        }
        if adapter:
            parameters["adapter"] = str(adapter)
        self.add_result(result, volumeNode, parameters=parameters, cancel=cancel)
        return result

    def load_results(self, out_dir: str | Path, volumeNode, parameters: dict | None = None):
        """Nodes for a results folder written by ``medalign screen`` (the background process)."""
        from medalign.inference.results import ScreeningResult

        result = ScreeningResult.read(out_dir)
        params = {"model": result.model, "findings": [f.name for f in result.findings], "device": result.device}
        params.update(parameters or {})
        return self.add_result(result, volumeNode, parameters=params)

    # ------------------------------------------------------------------ result -> nodes
    def add_result(self, result: ScreeningResult, inputNode, parameters: dict | None = None,
                   cancel: CancelFn | None = None):
        """Create the table node, the map volume nodes and their subject hierarchy folder.

        Everything is built detached first and added at the end; if anything fails (or
        ``cancel()`` turns True before the nodes are added) whatever was added is removed.
        Returns the results table node.
        """
        from slicer import vtkMRMLScalarVolumeDisplayNode

        scene = self.scene
        input_name = inputNode.GetName()
        ranked = result.ranked()
        table = self._build_table(result, ranked, input_name, parameters)
        maps = []
        for finding in ranked:
            if finding.map is None:
                continue
            node = node_from_volume(scene, finding.map, f"MedAlign {finding.name} ({input_name})", add=False)
            node.SetAttribute(ROLE, "map")
            node.SetAttribute(FINDING, finding.name)
            node.SetAttribute(HOTSPOT_JSON, json.dumps(_hotspot_dict(finding)))
            display = vtkMRMLScalarVolumeDisplayNode()
            lo, hi = _finite_range(finding.map.array)
            threshold = finding.hotspot.threshold if finding.hotspot is not None else threshold_value(lo, hi, 0.5)
            _style_map_display(display, threshold, hi)
            maps.append((finding, node, display))

        if cancel is not None and cancel():
            raise CancelledError("Screening was cancelled; no nodes were created.")

        added: list = []
        sh = scene.GetSubjectHierarchyNode()
        created_items: list[int] = []
        try:
            color = find_color_node(scene)
            if color is None:
                color = build_color_node()
                added += _add_with_storage(scene, color)
            for _finding, node, display in maps:
                scene.AddNode(display)
                added.append(display)
                display.SetAndObserveColorNodeID(color.GetID())
                added += _add_with_storage(scene, node)
                node.SetAndObserveDisplayNodeID(display.GetID())
            added += _add_with_storage(scene, table)
            table.SetNodeReferenceID(REF_INPUT, inputNode.GetID())
            for _finding, node, _display in maps:
                table.AddNodeReferenceID(REF_MAP, node.GetID())
                node.SetNodeReferenceID(REF_INPUT, inputNode.GetID())
                node.SetNodeReferenceID(REF_RESULTS, table.GetID())
            if sh is not None:
                self._place_in_hierarchy(sh, inputNode, [table] + [n for _f, n, _d in maps], result.model, created_items)
        except BaseException:
            if sh is not None:
                for item in reversed(created_items):
                    if sh.GetItemName(item) is not None:
                        sh.RemoveItem(item, False, True)
            for node in reversed(added):
                if scene.IsNodePresent(node):
                    scene.RemoveNode(node)
            raise
        self.last_table = table
        return table

    def _build_table(self, result: ScreeningResult, ranked: list, input_name: str, parameters: dict | None):
        from slicer import vtkMRMLTableNode

        table_node = vtkMRMLTableNode()
        table_node.SetName(f"MedAlign results ({input_name})")
        # Column names as the header, not as an editable row 0 that shifts every row by one
        # (Slicer qMRMLTableModel.cxx:245-251, v5.8.1); read-only in every table view
        # (vtkMRMLTableNode.h:111-113 "cannot be edited through the user interface").
        table_node.SetUseColumnTitleAsColumnHeader(True)
        table_node.SetLocked(True)
        table_node.SetAttribute(ROLE, "results")
        table_node.SetAttribute(RESULT_JSON, json.dumps(result.to_dict()))
        table_node.SetAttribute(PARAMETERS_JSON, json.dumps(parameters or {}))
        columns = {}
        for name in TABLE_COLUMNS:
            array = vtk.vtkStringArray() if name in ("finding", "flag") else vtk.vtkDoubleArray()
            array.SetName(name)
            columns[name] = array
        for f in ranked:
            ras = f.hotspot.ras if f.hotspot is not None else (math.nan,) * 3
            columns["finding"].InsertNextValue(f.name)
            columns["probability"].InsertNextValue(float(f.probability))
            columns["uncertainty"].InsertNextValue(float(f.uncertainty))
            columns["flag"].InsertNextValue(f.flag_state)
            columns["held-out AUC"].InsertNextValue(math.nan if f.validation_auc is None else float(f.validation_auc))
            for axis, value in zip("RAS", ras):
                columns[f"hotspot {axis}"].InsertNextValue(float(value))
            columns["extent_mm3"].InsertNextValue(float(f.hotspot.extent_mm3) if f.hotspot is not None else math.nan)
        table = table_node.GetTable()
        for name in TABLE_COLUMNS:
            table.AddColumn(columns[name])
        descriptions = {
            "probability": "Probability that the finding is present (softmax over present/absent prompts)",
            "uncertainty": "Entropy (bits, 0 sure to 1 coin toss) of the mean probability over prompt wordings and views",
            "flag": "Probability above the model's per-finding threshold; 'near chance': never flagged, see held-out AUC",
            "held-out AUC": f"The model's AUC for the finding on its held-out validation set; below {MIN_FLAG_AUC} it is never flagged",
            "extent_mm3": "Volume of the map's connected region around the hotspot",
        }
        for name, text in descriptions.items():
            table_node.SetColumnDescription(name, text)
        for axis in "RAS":
            table_node.SetColumnUnitLabel(f"hotspot {axis}", "mm")
        table_node.SetColumnUnitLabel("extent_mm3", "mm3")
        return table_node

    @staticmethod
    def _place_in_hierarchy(sh, inputNode, nodes: list, model: str, created: list[int]) -> None:
        """Put the run's nodes in a folder under the input's subject hierarchy item."""
        input_item = sh.GetItemByDataNode(inputNode)
        if not input_item:
            input_item = sh.CreateItem(sh.GetSceneItemID(), inputNode)
            created.append(input_item)
        folder = sh.CreateFolderItem(input_item, f"MedAlign ({model})")
        created.append(folder)
        for node in nodes:
            item = sh.GetItemByDataNode(node)
            if item:
                sh.SetItemParent(item, folder)
            else:
                sh.CreateItem(folder, node)

    # ------------------------------------------------------------------ nodes -> result
    def results_tables(self, inputNode=None) -> list:
        """Results table nodes in the scene (optionally only those of ``inputNode``), oldest first."""
        tables = []
        for node in nodes_of_class(self.scene, "vtkMRMLTableNode"):
            if node.GetAttribute(ROLE) != "results":
                continue
            if inputNode is not None and node.GetNodeReferenceID(REF_INPUT) != inputNode.GetID():
                continue
            tables.append(node)
        return tables

    def _table(self, table=None):
        if table is not None:
            return table
        if self.last_table is not None and self.scene.IsNodePresent(self.last_table):
            return self.last_table
        tables = self.results_tables()
        if not tables:
            raise InputError("There are no MedAlign results in the scene; screen a volume first.")
        return tables[-1]

    def map_nodes(self, table=None) -> dict[str, Any]:
        """Finding name -> map volume node of a results table (default: the latest)."""
        table = self._table(table)
        out = {}
        for index in range(table.GetNumberOfNodeReferences(REF_MAP)):
            node = table.GetNthNodeReference(REF_MAP, index)
            if node is not None:
                out[node.GetAttribute(FINDING)] = node
        return out

    def map_node(self, finding: str, table=None):
        table = self._table(table)
        for name, node in self.map_nodes(table).items():
            if name.lower() == finding.lower():
                return node
        listed = {table.GetCellText(row, 0).lower() for row in range(table.GetNumberOfRows())}
        if finding.lower() in listed:
            raise InputError(f"The map of '{finding}' is no longer in the scene; screen the volume again to see it.")
        raise InputError(f"The results have no map for '{finding}'.")

    @staticmethod
    def finding_at_row(table, row: int) -> str:
        """Finding name shown in a row of a results table (for clicks in the table view)."""
        return table.GetCellText(row, 0)

    def result_from_table(self, table=None, load_maps: bool = True) -> ScreeningResult:
        """Rebuild the engine's ``ScreeningResult`` from a (possibly reloaded) results table."""
        from medalign.inference.results import ScreeningResult

        table = self._table(table)
        text = table.GetAttribute(RESULT_JSON)
        if not text:
            raise InputError(f"The table '{table.GetName()}' is not a MedAlign results table.")
        maps = self.map_nodes(table) if load_maps else {}
        return ScreeningResult.from_dict(
            json.loads(text), lambda d: volume_from_node(maps[d["name"]]) if d["name"] in maps else None
        )

    # ------------------------------------------------------------------ display
    def show_map(self, finding, opacity: float = 0.5, threshold: float | None = None, layout: int | None = None,
                 table=None):
        """Overlay a finding's map on every slice view, input as background.

        ``finding`` is a name or a map node; ``threshold`` is a fraction (0..1) of the map's
        peak below which the map is transparent (None: the hotspot's own threshold);
        ``layout`` optionally sets the scene's view arrangement (a vtkMRMLLayoutNode value).
        In the 3D view the map's region shows as its own object (``map_surface``: the
        iso-surface at the same threshold, with the overlay's opacity). Returns the map node.
        """
        map_node = finding if hasattr(finding, "GetID") else self.map_node(finding, table)
        input_node = map_node.GetNodeReference(REF_INPUT)
        display = map_node.GetDisplayNode()
        lo, hi = map_node.GetImageData().GetScalarRange()
        if threshold is None:
            hotspot = json.loads(map_node.GetAttribute(HOTSPOT_JSON) or "null")
            value = hotspot["threshold"] if hotspot else threshold_value(lo, hi, 0.5)
        else:
            value = threshold_value(lo, hi, threshold)
        _style_map_display(display, value, hi)
        opacity = float(min(1.0, max(0.0, opacity)))
        for composite in nodes_of_class(self.scene, "vtkMRMLSliceCompositeNode"):
            if input_node is not None:
                composite.SetBackgroundVolumeID(input_node.GetID())
            composite.SetForegroundVolumeID(map_node.GetID())
            composite.SetForegroundOpacity(opacity)
        self._show_legend(map_node)
        self._show_surface(map_node, value, opacity)
        if layout is not None:
            layouts = nodes_of_class(self.scene, "vtkMRMLLayoutNode")
            if layouts:
                layouts[0].SetViewArrangement(int(layout))
        return map_node

    def _show_surface(self, map_node, value: float, opacity: float) -> None:
        """The map's region as a solid in the 3D view (``map_surface``), beside the map in
        the subject hierarchy, saved with the scene."""
        from .map_surface import show_surface, surface_of

        new = surface_of(map_node) is None
        surface = show_surface(self.scene, map_node, value, opacity, add_node=lambda node: _add_with_storage(self.scene, node))
        if new:
            self._parent_like(surface, map_node)

    def _show_legend(self, map_node) -> None:
        """A colour legend for the shown map only (other MedAlign maps' legends are hidden)."""
        from slicer import vtkSlicerColorLogic

        register_node_classes(self.scene)
        for legend in nodes_of_class(self.scene, "vtkMRMLColorLegendDisplayNode"):
            owner = legend.GetDisplayableNode()
            if owner is not None and owner.GetAttribute(ROLE) == "map" and owner is not map_node:
                legend.SetVisibility(False)
        legend = vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(map_node)
        if legend is not None:
            legend.SetTitleText(map_node.GetAttribute(FINDING) or map_node.GetName())
            legend.SetVisibility(True)

    # ------------------------------------------------------------------ segments
    def hotspot_to_segment(self, finding, segmentationNode=None, table=None, threshold: float | None = None):
        """Turn a finding's hotspot region into a segment.

        The region is the engine's hotspot (``hotspot_of``: the connected voxels around the
        map's peak at or above ``threshold`` x peak; None: the engine's default fraction),
        so the segment is exactly the region the results table reports. The segment, named
        after the finding, replaces one of the same name in ``segmentationNode`` (default:
        the results' segmentation, created on first use). Returns ``(segmentationNode, segmentId)``.
        """
        from slicer import vtkOrientedImageData

        map_node = finding if hasattr(finding, "GetID") else self.map_node(finding, table)
        name = map_node.GetAttribute(FINDING) or map_node.GetName()
        table = map_node.GetNodeReference(REF_RESULTS)
        input_node = map_node.GetNodeReference(REF_INPUT)
        volume = volume_from_node(map_node)
        mask = _hotspot_mask(volume, threshold)
        if mask is None:
            raise InputError(f"The map of '{name}' has no positive value, so it has no hotspot to turn into a segment.")

        labelmap = image_data_from_array(mask, vtkOrientedImageData)
        labelmap.SetImageToWorldMatrix(numpy_to_matrix(volume.ijk_to_ras))

        created = None
        if segmentationNode is None and table is not None:
            segmentationNode = table.GetNodeReference(REF_SEGMENTATION)
        try:
            if segmentationNode is None:
                segmentationNode = created = self.scene.AddNewNodeByClass(
                    "vtkMRMLSegmentationNode", f"MedAlign hotspots ({input_node.GetName() if input_node else name})"
                )
                created.SetAttribute(ROLE, "segmentation")
                created.CreateDefaultDisplayNodes()
                if input_node is not None:
                    created.SetReferenceImageGeometryParameterFromVolumeNode(input_node)
                if table is not None:
                    table.SetNodeReferenceID(REF_SEGMENTATION, created.GetID())
                    self._parent_like(created, table)
            segmentation = segmentationNode.GetSegmentation()
            old = segmentation.GetSegmentIdBySegmentName(name)
            if old:
                segmentation.RemoveSegment(old)
            segment_id = segmentationNode.AddSegmentFromBinaryLabelmapRepresentation(labelmap, name, SEGMENT_COLOR)
            if not segment_id:
                raise InputError(f"Could not create a segment for '{name}'.")
        except BaseException:
            if created is not None:
                if table is not None and table.GetNodeReferenceID(REF_SEGMENTATION) == created.GetID():
                    table.RemoveNodeReferenceIDs(REF_SEGMENTATION)
                self.scene.RemoveNode(created)
            raise
        return segmentationNode, segment_id

    def _parent_like(self, node, sibling) -> None:
        sh = self.scene.GetSubjectHierarchyNode()
        if sh is None:
            return
        parent = sh.GetItemParent(sh.GetItemByDataNode(sibling)) if sh.GetItemByDataNode(sibling) else 0
        if not parent:
            return
        item = sh.GetItemByDataNode(node)
        if item:
            sh.SetItemParent(item, parent)
        else:
            sh.CreateItem(parent, node)

    # ------------------------------------------------------------------ export
    def export(self, result_or_table, out_dir: str | Path, segmentation=None) -> Path:
        """Write the structured report (report.json/csv/html) plus results and maps.

        ``segmentation`` (a segmentation or labelmap volume node, or an engine
        ``Segmentation``) names the structure under each hotspot; None picks the one the
        scene makes obvious (``obvious_anatomy``). The report says which was used; a bad
        one (empty, unnamed, elsewhere) is one sentence in it (``anatomy_note``), never an
        error, and locations fall back to positions relative to the scan.
        """
        from .anatomy import anatomy_for_report
        from .report import export_report

        is_result = hasattr(result_or_table, "findings")
        table = None if is_result else self._table(result_or_table)
        result = result_or_table if is_result else self.result_from_table(table)
        note = None
        if segmentation is None:
            segmentation, note = self.obvious_anatomy(self._input_of(result, table))
        anatomy, problem = anatomy_for_report(segmentation, result)
        return export_report(result, out_dir, anatomy, problem or note)

    def obvious_anatomy(self, input_node) -> tuple[Any, str | None]:
        """(The segmentation node made for ``input_node``, or None; a sentence when the
        choice is not obvious). Made for it: its reference geometry is that volume, as
        Segment Editor and TotalSegmentator set it; MedAlign's own hotspot segments are no
        anatomy. Two or more such: none is picked, the sentence says so."""
        if input_node is None:
            return None, None
        from slicer import vtkMRMLSegmentationNode

        role = vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        found = [node for node in nodes_of_class(self.scene, "vtkMRMLSegmentationNode")
                 if node.GetAttribute(ROLE) != "segmentation" and node.GetNodeReferenceID(role) == input_node.GetID()]
        if len(found) > 1:
            listed = ", ".join(f"'{node.GetName()}'" for node in found)
            return None, (f"Segmentations {listed} all belong to '{input_node.GetName()}'; choose one as Anatomy "
                          "to name structures, locations are given relative to the scan instead.")
        return (found[0] if found else None), None

    def _input_of(self, result: ScreeningResult, table=None):
        """The screened volume node: the table's input reference, else the node id the
        in-process screening recorded in the result (None when it is gone)."""
        if table is not None:
            return table.GetNodeReference(REF_INPUT)
        node_id = result.input.get("node_id") if isinstance(result.input, dict) else None
        return self.scene.GetNodeByID(node_id) if node_id else None


# ---------------------------------------------------------------------- helpers
def register_node_classes(scene) -> None:
    """Make ``scene`` able to create (and so load) every node class the results use.

    Real Slicer's Colors module registers the colour legend display node; a bare
    slicer-core scene does not, and then cannot load a saved scene that has a legend.
    Call before loading a scene headless (``ScreeningLogic(scene)`` does it).
    """
    from slicer import vtkMRMLColorLegendDisplayNode

    if not scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):
        scene.RegisterNodeClass(vtkMRMLColorLegendDisplayNode())


def is_medalign_map(node) -> bool:
    """True for the alignment-map volumes MedAlign creates (never a CT to screen)."""
    return node is not None and node.GetAttribute(ROLE) == "map"


def _hotspot_mask(volume, fraction: float | None) -> np.ndarray | None:
    """uint8 [k, j, i] mask of the engine's hotspot region (``hotspot_region``, the rule
    behind ``hotspot_of``: the connected voxels at or above ``fraction`` x the positive
    peak); None when the map has no positive finite value."""
    from medalign.inference.hotspot import hotspot_region

    region = hotspot_region(volume.array) if fraction is None else hotspot_region(volume.array, fraction=float(fraction))
    return None if region is None else region.mask.astype(np.uint8)


def threshold_value(lo: float, hi: float, fraction: float) -> float:
    """Where the map's colour window starts for a slider ``fraction`` (display only; segments
    use the engine's ``hotspot_of``): that fraction of the peak when the peak is positive,
    else that fraction of the way from the minimum to the peak."""
    fraction = float(min(1.0, max(0.0, fraction)))
    if hi > 0:
        return fraction * hi
    return lo + fraction * (hi - lo)


def _finite_range(array: np.ndarray) -> tuple[float, float]:
    finite = array[np.isfinite(array)] if not np.isfinite(array).all() else array
    if finite.size == 0:
        return 0.0, 0.0
    return float(finite.min()), float(finite.max())


def _style_map_display(display, threshold: float, peak: float) -> None:
    """Colour window from the threshold to the peak; voxels below the threshold transparent."""
    top = peak if peak > threshold else threshold + 1e-6
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(float(threshold), float(top))
    display.SetLowerThreshold(float(threshold))
    display.SetUpperThreshold(float(max(top, peak)) + 1e-6)
    display.ApplyThresholdOn()
    display.SetInterpolate(True)


def _add_with_storage(scene, node) -> list:
    """Add a node and a default storage node (so saving the scene writes its data)."""
    scene.AddNode(node)
    added = [node]
    storage = node.CreateDefaultStorageNode()
    if storage is not None:
        scene.AddNode(storage)
        added.append(storage)
        node.SetAndObserveStorageNodeID(storage.GetID())
    return added


def _hotspot_dict(finding: FindingResult) -> dict | None:
    h = finding.hotspot
    if h is None:
        return None
    return {"ras": [float(v) for v in h.ras], "value": float(h.value), "extent_mm3": float(h.extent_mm3),
            "threshold": float(h.threshold)}
