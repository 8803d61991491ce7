"""Nodes of a class in a scene, without leaking the collection MRML hands back.

``vtkMRMLScene::GetNodesByClass`` and ``GetNodesByClassByName`` return a new
``vtkCollection`` the caller must delete (vtkMRMLScene.h:298,318 at Slicer 583e9b37); the
Python wrapping adds its own reference, so each call leaks one collection unless it is
``UnRegister``-ed, as ``slicer.util.getNodesByClass`` does (util.py:1916-1917). The glue
cannot use ``slicer.util`` (it runs on slicer-core), so this is its one way to ask.
"""

from __future__ import annotations

__all__ = ["nodes_of_class"]


def nodes_of_class(scene, class_name: str, name: str | None = None) -> list:
    """Every node of ``class_name`` in ``scene`` (only those called ``name`` when given)."""
    collection = scene.GetNodesByClass(class_name) if name is None else scene.GetNodesByClassByName(class_name, name)
    collection.UnRegister(None)
    return [collection.GetItemAsObject(index) for index in range(collection.GetNumberOfItems())]
