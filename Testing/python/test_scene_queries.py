"""MRML hands back node collections the caller must delete; the glue asks in one leak-free way."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("trame_slicer", reason="needs slicer-core: pip install 'trame-slicer[standalone]'")

GLUE = Path(__file__).resolve().parents[2] / "SlicerMedAlign" / "MedAlignLib"


@pytest.fixture(scope="module")
def scene():
    from trame_slicer.core import SlicerApp

    return SlicerApp().scene


def test_a_raw_collection_is_owned_twice_and_nodes_of_class_releases_one(scene):
    from MedAlignLib.scene_queries import nodes_of_class

    raw = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    assert raw.GetReferenceCount() == 2  # Python's reference + the one the caller must delete
    raw.UnRegister(None)
    listed = nodes_of_class(scene, "vtkMRMLSliceCompositeNode")
    assert [n.GetID() for n in listed] == [raw.GetItemAsObject(i).GetID() for i in range(raw.GetNumberOfItems())]


def test_nodes_of_class_by_name(scene):
    from MedAlignLib.scene_queries import nodes_of_class

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "findme")
    assert nodes_of_class(scene, "vtkMRMLScalarVolumeNode", "findme") == [node]
    assert nodes_of_class(scene, "vtkMRMLScalarVolumeNode", "absent") == []


def test_the_glue_asks_the_scene_for_collections_only_through_nodes_of_class():
    offenders = [p.name for p in GLUE.glob("*.py") if p.name != "scene_queries.py"
                 and re.search(r"GetNodesByClass(ByName)?\(", p.read_text(encoding="utf-8"))]
    assert offenders == []
