"""Volume nodes <-> engine ``Volume``: the only place voxels cross between MRML and NumPy.

Both directions copy, so the engine can never write into a node the user is looking at
and a node never aliases memory that NumPy may free. Geometry travels as the IJK-to-RAS
matrix, which is exactly ``Volume.ijk_to_ras``; a linear parent transform is folded in
(what the user sees is what gets screened), a non-linear one is refused.
"""

from __future__ import annotations

import numpy as np
import vtk
from vtk.util import numpy_support

from medalign.core.errors import InputError
from medalign.core.volume import Volume

__all__ = [
    "volume_from_node",
    "node_from_volume",
    "matrix_to_numpy",
    "numpy_to_matrix",
    "ijk_to_ras_of",
    "to_world_of",
    "image_data_from_array",
]


def matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijk_to_ras_of(node, world: bool = True) -> np.ndarray:
    """4x4 IJK->RAS of a volume node; with ``world`` a linear parent transform is applied."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = matrix_to_numpy(matrix)
    return to_world_of(node) @ ijk_to_ras if world else ijk_to_ras


def to_world_of(node) -> np.ndarray:
    """4x4 from a transformable node's own coordinates to world RAS (identity without a
    parent transform); a non-linear parent transform is refused, as screening refuses it."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        kind = "segmentation" if node.IsA("vtkMRMLSegmentationNode") else "volume"
        raise InputError(
            f"The {kind} '{node.GetName()}' is under a non-linear transform; harden the transform before using it."
        )
    to_world = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(to_world)
    return matrix_to_numpy(to_world)


def _engine_dtype(array: np.ndarray) -> np.ndarray:
    """HU as int16 when it fits (else float32): the engine never gets float64 or int32 volumes."""
    if array.dtype in (np.int16, np.float32):
        return array.copy()
    if np.issubdtype(array.dtype, np.integer) and array.size:
        if int(array.min()) >= -32768 and int(array.max()) <= 32767:
            return array.astype(np.int16)
    return array.astype(np.float32)


def volume_from_node(node) -> Volume:
    """A copy of a scalar volume node's voxels ([k, j, i]) and world geometry."""
    if node is None:
        raise InputError("No volume was selected.")
    image = node.GetImageData() if hasattr(node, "GetImageData") else None
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None:
        raise InputError(f"The volume '{node.GetName()}' has no voxel data.")
    if scalars.GetNumberOfComponents() != 1:
        raise InputError(
            f"The volume '{node.GetName()}' has {scalars.GetNumberOfComponents()} components per voxel; "
            "MedAlign needs a single-component (grey-scale) CT."
        )
    ni, nj, nk = image.GetDimensions()
    array = _engine_dtype(numpy_support.vtk_to_numpy(scalars).reshape(nk, nj, ni))
    metadata = {"name": node.GetName(), "node_id": node.GetID() or ""}
    storage = node.GetStorageNode()
    if storage is not None and storage.GetFileName():
        metadata["path"] = storage.GetFileName()
    modality = _modality(node)
    if modality:
        metadata["modality"] = modality
    return Volume(array=array, ijk_to_ras=ijk_to_ras_of(node), metadata=metadata)


def _modality(node) -> str | None:
    """DICOM modality recorded by Slicer's DICOM import (subject hierarchy attribute), if any."""
    scene = node.GetScene()
    sh = scene.GetSubjectHierarchyNode() if scene is not None else None
    if sh is None:
        return None
    item = sh.GetItemByDataNode(node)
    if not item:
        return None
    value = sh.GetItemAttribute(item, "DICOM.Modality")
    return value or None


def image_data_from_array(array: np.ndarray, image_class=vtk.vtkImageData):
    """A new vtkImageData (or subclass) owning a copy of a [k, j, i] array; origin 0, spacing 1."""
    array = np.ascontiguousarray(array)
    if array.ndim != 3:
        raise InputError(f"A volume needs a 3D [k, j, i] array, not {array.ndim}D.")
    nk, nj, ni = array.shape
    image = image_class()
    image.SetDimensions(ni, nj, nk)
    vtk_array = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image.GetPointData().SetScalars(vtk_array)
    return image


def node_from_volume(scene, volume: Volume, name: str, add: bool = True):
    """A new ``vtkMRMLScalarVolumeNode`` holding a copy of ``volume``.

    With ``add`` (default) the node is added to ``scene`` with a grey display node; with
    ``add=False`` it is returned detached so callers can build results all-or-nothing.
    """
    from slicer import vtkMRMLScalarVolumeDisplayNode, vtkMRMLScalarVolumeNode

    node = vtkMRMLScalarVolumeNode()
    node.SetName(name)
    node.SetAndObserveImageData(image_data_from_array(volume.array))
    node.SetIJKToRASMatrix(numpy_to_matrix(volume.ijk_to_ras))
    if add:
        scene.AddNode(node)
        display = vtkMRMLScalarVolumeDisplayNode()
        scene.AddNode(display)
        display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
        display.AutoWindowLevelOn()
        node.SetAndObserveDisplayNodeID(display.GetID())
    return node
