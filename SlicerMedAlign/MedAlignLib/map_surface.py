"""The shown alignment map as its own object in the 3D view: the surface where the map
crosses the overlay's threshold.

On the slice views the map is a coloured layer; in the 3D view a layer is only seen on the
three slice planes, so the region the map points at is easy to miss. A model node built
from the map's iso-surface at the display threshold shows that region as a solid in 3D
(only there: the slice views already show the map). It follows the overlay: the shown
finding's surface is visible, every other MedAlign surface hidden; its opacity is the
overlay's (opacity 0 hides it) and it is rebuilt when the threshold moves.
"""

from __future__ import annotations

import vtk

from .logic import FINDING, ROLE

SURFACE_ROLE = "map-surface"
SURFACE_LEVEL = "MedAlign.SurfaceLevel"  # the map value the surface was built at
REF_SURFACE = "MedAlign.Surface"  # map node -> its surface model node
SURFACE_COLOR = (0.99, 0.65, 0.04)  # inferno's orange: the map's bright end


def surface_polydata(map_node, level: float) -> vtk.vtkPolyData:
    """The iso-surface of ``map_node``'s voxels at ``level``, in RAS millimetres.

    A volume node's image data lies on the IJK grid (origin 0, spacing 1); its
    IJK-to-RAS matrix places it, so the surface is transformed by that matrix. Normals
    are computed after the transform (a left-handed grid would turn them inside out).
    """
    contour = vtk.vtkFlyingEdges3D()
    contour.SetInputData(map_node.GetImageData())
    contour.SetValue(0, float(level))
    contour.ComputeNormalsOff()
    matrix = vtk.vtkMatrix4x4()
    map_node.GetIJKToRASMatrix(matrix)
    transform = vtk.vtkTransform()
    transform.SetMatrix(matrix)
    to_ras = vtk.vtkTransformPolyDataFilter()
    to_ras.SetInputConnection(contour.GetOutputPort())
    to_ras.SetTransform(transform)
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputConnection(to_ras.GetOutputPort())
    normals.ConsistencyOn()
    normals.AutoOrientNormalsOn()
    normals.SplittingOff()
    normals.Update()
    surface = vtk.vtkPolyData()
    surface.DeepCopy(normals.GetOutput())
    return surface


def is_map_surface(node) -> bool:
    return node is not None and node.IsA("vtkMRMLModelNode") and node.GetAttribute(ROLE) == SURFACE_ROLE


def surface_of(map_node):
    """The surface model node made for ``map_node`` (None before the map was first shown)."""
    node = map_node.GetNodeReference(REF_SURFACE)
    return node if is_map_surface(node) else None


def _new_surface(scene, map_node, add_node):
    from slicer import vtkMRMLModelDisplayNode, vtkMRMLModelNode

    finding = map_node.GetAttribute(FINDING) or map_node.GetName()
    model = vtkMRMLModelNode()
    model.SetName(scene.GenerateUniqueName(f"{finding} map surface"))
    model.SetAttribute(ROLE, SURFACE_ROLE)
    model.SetAttribute(FINDING, finding)
    add_node(model)
    display = vtkMRMLModelDisplayNode()
    scene.AddNode(display)
    display.SetColor(*SURFACE_COLOR)
    display.SetVisibility2D(False)  # the slice views show the map itself
    display.SetBackfaceCulling(False)
    model.SetAndObserveDisplayNodeID(display.GetID())
    map_node.SetNodeReferenceID(REF_SURFACE, model.GetID())
    return model


def show_surface(scene, map_node, level: float, opacity: float, add_node=None):
    """Show ``map_node``'s surface at ``level`` with ``opacity`` in the 3D view and hide every
    other MedAlign surface; returns the surface model node (built on first use, rebuilt
    when ``level`` changed). ``add_node(node)`` adds a new node to the scene (default
    ``scene.AddNode``; the logic passes one that also gives it a storage node)."""
    model = surface_of(map_node)
    if model is None:
        model = _new_surface(scene, map_node, add_node or scene.AddNode)
    if model.GetAttribute(SURFACE_LEVEL) != repr(float(level)):
        model.SetAndObservePolyData(surface_polydata(map_node, level))
        model.SetAttribute(SURFACE_LEVEL, repr(float(level)))
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLModelNode")):
        other = scene.GetNthNodeByClass(index, "vtkMRMLModelNode")
        if is_map_surface(other) and other is not model and other.GetDisplayNode() is not None:
            other.GetDisplayNode().SetVisibility(False)
    display = model.GetDisplayNode()
    display.SetOpacity(float(opacity))
    display.SetVisibility(opacity > 0 and model.GetPolyData().GetNumberOfPoints() > 0)
    return model


__all__ = ["REF_SURFACE", "SURFACE_ROLE", "is_map_surface", "show_surface", "surface_of", "surface_polydata"]
