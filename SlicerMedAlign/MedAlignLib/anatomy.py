"""An anatomy segmentation from the scene -> the engine's ``Segmentation``, so the structured
report names the structure under each hotspot ("in the liver") instead of a position
relative to the scan.

Two kinds of node carry anatomy in Slicer: a segmentation node (e.g. TotalSegmentator's
output; the segment names are the structure names) and a labelmap volume (the names are
those of its colour table). Both become one labelmap Volume in world RAS plus {label: name}.
The segmentation is merged with slicer-core's own export code, detached from the scene (no
node is added, the user's nodes are not modified), and its geometry goes through the same
``volume_from_node`` as every screened volume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import vtk

from medalign.core.errors import InputError
from medalign.inference.report import NEAREST_MM, Segmentation, label_name

from .nodes import to_world_of, volume_from_node

if TYPE_CHECKING:
    from medalign.inference.results import ScreeningResult

__all__ = ["ANATOMY_NODE_TYPES", "anatomy_for_report", "overlaps_maps", "segmentation_from_node"]

ANATOMY_NODE_TYPES = ("vtkMRMLSegmentationNode", "vtkMRMLLabelMapVolumeNode")
RELATIVE = "locations are given relative to the scan instead"


def segmentation_from_node(node) -> Segmentation:
    """The engine's ``Segmentation`` of a segmentation or labelmap volume node.

    Raises ``InputError`` (one sentence) when the node cannot name any structure: no
    segments or labelled voxels, no names, or a non-linear transform.
    """
    if node is None:
        raise InputError("No anatomy segmentation was selected.")
    if node.IsA("vtkMRMLSegmentationNode"):
        return _from_segmentation_node(node)
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        return _from_labelmap_node(node)
    raise InputError(f"'{node.GetName()}' is neither a segmentation nor a labelmap volume, so it names no anatomy.")


def _from_segmentation_node(node) -> Segmentation:
    """Segments merged into one labelmap, label = 1 + the segment's index (the rule of
    vtkSegmentation::GenerateMergedLabelmap, vtkSegmentation.cxx:1636-1690 at v5.8.1)."""
    from slicer import (
        vtkMRMLLabelMapVolumeNode,
        vtkMRMLSegmentationNode,
        vtkOrientedImageData,
        vtkSegmentation,
        vtkSegmentationConverter,
        vtkSlicerSegmentationsModuleLogic,
    )

    name = node.GetName()
    segmentation = node.GetSegmentation()
    ids = vtk.vtkStringArray()
    segmentation.GetSegmentIDs(ids)
    if ids.GetNumberOfValues() == 0:
        raise InputError(f"The segmentation '{name}' has no segments.")
    names = {}
    for index in range(ids.GetNumberOfValues()):
        text = label_name(segmentation.GetSegment(ids.GetValue(index)).GetName() or "")
        if text:
            names[index + 1] = text
    if not names:
        raise InputError(f"The segments of '{name}' have no names.")
    # A segmentation held as surfaces needs its labelmap representation first, as the
    # Segmentations module's export makes it (vtkSlicerSegmentationsModuleLogic.cxx:1064-1071
    # at v5.8.1); made on a detached copy here, so the user's node is not modified.
    binary = vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    source = node
    if not segmentation.ContainsRepresentation(binary):
        source = vtkMRMLSegmentationNode()
        source.GetSegmentation().DeepCopy(segmentation)
        if not source.GetSegmentation().CreateRepresentation(binary):
            raise InputError(f"The segmentation '{name}' cannot be turned into a labelmap.")
    merged = vtkOrientedImageData()
    # Static, headless, no node added (vtkSlicerSegmentationsModuleLogic.h:451-452 at v5.8.1);
    # in the segmentation node's own coordinates (its parent transform applied below).
    vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(
        source, None, ids, vtkSegmentation.EXTENT_UNION_OF_EFFECTIVE_SEGMENTS, merged)
    labelmap = vtkMRMLLabelMapVolumeNode()  # detached: the scene gets no node
    # IJK-to-RAS of the exported labelmap: origin moved so the first voxel is IJK 0
    # (CopyOrientedImageDataToVolumeNode's ShiftImageDataExtentToZeroStart, .cxx:364-401).
    if merged.IsEmpty() or not vtkSlicerSegmentationsModuleLogic.CreateLabelmapVolumeFromOrientedImageData(merged, labelmap):
        raise InputError(f"The segmentation '{name}' is empty (none of its segments has a voxel).")
    labelmap.SetName(name)
    volume = volume_from_node(labelmap)
    volume.ijk_to_ras = to_world_of(node) @ volume.ijk_to_ras
    return _named(Segmentation(volume, names, source=f"segmentation '{name}'"), name)


def _from_labelmap_node(node) -> Segmentation:
    """A labelmap volume with the names its colour table gives the labels it holds."""
    name = node.GetName()
    volume = volume_from_node(node)
    labels = [int(v) for v in np.unique(volume.array) if v != 0]
    if not labels:
        raise InputError(f"The labelmap '{name}' is empty (every voxel is 0).")
    display = node.GetDisplayNode()
    color = display.GetColorNode() if display is not None else None
    names = {v: text for v in labels if (text := _color_name(color, v))} if color is not None else {}
    if not names:
        raise InputError(f"The labels of '{name}' have no names in its colour table.")
    return Segmentation(volume, names, source=f"labelmap '{name}'")


def _color_name(color, value: int) -> str:
    """The colour table's name for a label, "" for none: out of range, undefined, made up
    from the colour ("R=... G=..."; vtkMRMLColorNode.cxx:290-330 at v5.8.1), or the label's
    own number (a labelmap loaded in Slicer gets GenericColors.txt, whose names are numbers:
    vtkSlicerVolumesLogic.cxx:457, vtkSlicerColorLogic.cxx:70-73 at v5.8.1). Undefined is
    the NoName "(none)" up to Slicer 5.8 (vtkMRMLColorNode.h:176, 219-221 at v5.8.1) and
    ``GetColorDefined`` after it, where ``GetNoName`` only warns that it is deprecated."""
    if value < 0 or value >= color.GetNumberOfColors():
        return ""
    if hasattr(color, "GetColorDefined") and not color.GetColorDefined(value):
        return ""
    text = color.GetColorName(value) or ""
    undefined = "(none)" if hasattr(color, "GetColorDefined") else color.GetNoName()
    if text in (undefined, "(none)", "invalid") or text.startswith("R="):
        return ""
    if text.strip() == str(value):  # Slicer's default labelmap table, GenericColors.txt, names 5 "5"
        return ""
    return label_name(text)


def _named(segmentation: Segmentation, name: str) -> Segmentation:
    """Refuse a segmentation whose only voxels belong to unnamed segments."""
    if not np.isin(segmentation.labelmap.array, list(segmentation.names)).any():
        raise InputError(f"The named segments of '{name}' are empty.")
    return segmentation


def overlaps_maps(segmentation: Segmentation, result: ScreeningResult) -> bool:
    """Whether the segmentation comes within ``NEAREST_MM`` of the region the maps cover
    (True when no finding has a map: there is nothing to locate)."""
    maps = [f.map for f in result.findings if f.map is not None]
    if not maps:
        return True
    lo, hi = segmentation.labelmap.ras_bounds()
    for volume in maps:
        map_lo, map_hi = volume.ras_bounds()
        if np.all(lo <= map_hi + NEAREST_MM) and np.all(hi >= map_lo - NEAREST_MM):
            return True
    return False


def anatomy_for_report(node, result: ScreeningResult) -> tuple[Segmentation | None, str | None]:
    """(Segmentation to name structures with, or None; one sentence on why an offered one
    was not used, or None). Never raises for a bad segmentation: the report is still written."""
    if node is None:
        return None, None
    try:
        segmentation = node if isinstance(node, Segmentation) else segmentation_from_node(node)
    except InputError as exc:
        return None, f"{str(exc).rstrip('.')}; {RELATIVE}."
    if not overlaps_maps(segmentation, result):
        return None, f"The {segmentation.source} does not overlap the screened volume; {RELATIVE}."
    return segmentation, None
