"""The structured report names the structure under a hotspot from an anatomy segmentation in
the scene (``MedAlignLib.anatomy``, ``ScreeningLogic.export(..., segmentation=)``): segment
and labelmap nodes on real slicer-core scenes, with LPS flips, a non-zero extent, a parent
transform, the automatic pick, and bad segmentations as one sentence in the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install 'trame-slicer[standalone]')")
pytest.importorskip("trame_slicer", reason="needs trame-slicer (pip install 'trame-slicer[standalone]')")

import vtk  # noqa: E402
from helpers import assert_one_sentence, new_app, synthetic_ct  # noqa: E402

from medalign.core.errors import InputError  # noqa: E402
from medalign.core.volume import Volume  # noqa: E402
from medalign.inference.results import FindingResult, Hotspot, ScreeningResult  # noqa: E402
from MedAlignLib import ScreeningLogic, export_summary, node_from_volume, segmentation_from_node  # noqa: E402
from MedAlignLib.nodes import image_data_from_array, numpy_to_matrix  # noqa: E402

LIVER_RAS = np.array([40.0, 20.0, -10.0])  # hotspot of the first finding; the "liver" cube sits here
SPLEEN_RAS = np.array([-60.0, 10.0, 20.0])


def _scene():
    app = new_app()
    ct = synthetic_ct()  # IJK->RAS diag(-5, -5, 6): the LPS flip of a NIfTI/DICOM CT
    node = node_from_volume(app.scene, ct, "CT")
    return app.scene, node, ct


def _result(ct: Volume, input_node=None, hotspots=(LIVER_RAS, SPLEEN_RAS)) -> ScreeningResult:
    """Two findings whose maps share the CT's grid and whose hotspots are given in RAS."""
    findings = []
    for name, ras in zip(("Pleural effusion", "Lung nodule"), hotspots):
        map_volume = Volume(np.zeros(ct.array.shape, np.float32), ct.ijk_to_ras.copy())
        findings.append(FindingResult(name=name, probability=0.8, uncertainty=0.05, flagged=True, score=1.0,
                                      map=map_volume, threshold=0.5,
                                      hotspot=Hotspot(ras=tuple(ras), value=1.0, extent_mm3=50.0, threshold=0.5)))
    inputs = {"node_id": input_node.GetID()} if input_node is not None else {}
    return ScreeningResult(input=inputs, model="m", device="cpu", findings=findings, elapsed_s=0.1, disclaimer="R.")


def _lps(spacing=(2.0, 2.0, 3.0), angle: float = 0.2) -> np.ndarray:
    """An LPS-flipped, slightly oblique IJK->RAS (origin 0) unlike the CT's: the segment has its own grid."""
    c, s = np.cos(angle), np.sin(angle)
    m = np.eye(4)
    m[:3, :3] = np.array([[-c, s, 0], [-s, -c, 0], [0, 0, 1.0]]) * np.asarray(spacing)
    return m


def _cube(center_ras, half: int = 2, start=(7, 3, 5)):
    """A vtkOrientedImageData (a segment's labelmap) on an ``_lps`` grid whose extent starts
    at ``start``, not 0, holding a (2*half+1)^3 cube of 1 centred on ``center_ras``."""
    from slicer import vtkOrientedImageData

    size = 2 * half + 9
    ijk_to_ras = _lps()
    centre_ijk = np.asarray(start) + size // 2
    ijk_to_ras[:3, 3] = np.asarray(center_ras) - ijk_to_ras[:3, :3] @ centre_ijk
    image = vtkOrientedImageData()
    image.SetExtent(start[0], start[0] + size - 1, start[1], start[1] + size - 1, start[2], start[2] + size - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    image.GetPointData().GetScalars().Fill(0)
    image.SetImageToWorldMatrix(numpy_to_matrix(ijk_to_ras))
    for i, j, k in np.ndindex(2 * half + 1, 2 * half + 1, 2 * half + 1):
        image.SetScalarComponentFromDouble(*(centre_ijk - half + [i, j, k]), 0, 1)
    return image


def _anatomy(scene, ct_node, name="Anatomy", segments=(("liver", LIVER_RAS), ("spleen", SPLEEN_RAS))):
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
    for segment_name, ras in segments:
        assert seg.AddSegmentFromBinaryLabelmapRepresentation(_cube(ras), segment_name)
    return seg


def _report(out) -> dict:
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


def _node_ids(scene) -> set:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def test_segment_under_the_hotspot_is_named_in_the_report(tmp_path):
    scene, ct_node, ct = _scene()
    seg = _anatomy(scene, ct_node)
    engine = segmentation_from_node(seg)
    assert engine.structure_at(LIVER_RAS) == ("liver", 0.0) and engine.structure_at(SPLEEN_RAS) == ("spleen", 0.0)
    assert engine.structure_at(LIVER_RAS + [0, 0, 40.0]) is None  # the LPS flip puts nothing above the liver
    before = _node_ids(scene)
    logic = ScreeningLogic(scene)
    out = logic.export(_result(ct), tmp_path / "out", segmentation=seg)
    report = _report(out)
    assert report["anatomy_source"] == "segmentation 'Anatomy'" and report["anatomy_note"] is None
    where = {f["finding"]: f["observations"] for f in report["findings"]}
    assert where["Pleural effusion"]["location"] == "in the liver" and where["Pleural effusion"]["structure"] == "liver"
    assert where["Lung nodule"]["structure"] == "spleen"
    assert "locations from segmentation &#x27;Anatomy&#x27;" in (out / "report.html").read_text(encoding="utf-8")
    assert export_summary(out) == f"Report written to {out}; locations from segmentation 'Anatomy'."
    assert _node_ids(scene) == before  # the merge is detached: the scene gets no labelmap or colour node


def test_parent_transform_of_the_segmentation_moves_its_structures():
    scene, ct_node, _ct = _scene()
    seg = _anatomy(scene, ct_node)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(2, 3, 30.0)  # 30 mm superior
    transform.SetMatrixTransformToParent(shift)
    seg.SetAndObserveTransformNodeID(transform.GetID())
    engine = segmentation_from_node(seg)
    assert engine.structure_at(LIVER_RAS + [0, 0, 30.0]) == ("liver", 0.0)
    assert engine.structure_at(LIVER_RAS) is None


def test_segmentation_held_as_surfaces_is_named_and_left_as_it_was():
    scene, ct_node, _ct = _scene()
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Surfaces")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
    seg.SetSourceRepresentationToClosedSurface()
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(*LIVER_RAS)
    sphere.SetRadius(12.0)
    sphere.Update()
    seg.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "liver")
    assert segmentation_from_node(seg).structure_at(LIVER_RAS) == ("liver", 0.0)
    assert not seg.GetSegmentation().ContainsRepresentation("Binary labelmap")  # converted on a copy


def test_labelmap_volume_names_come_from_its_colour_table(tmp_path):
    from slicer import vtkMRMLColorTableNode, vtkMRMLLabelMapVolumeNode

    scene, _ct_node, ct = _scene()
    affine = _lps(spacing=(2.0, 2.0, 2.5), angle=-0.1)
    affine[:3, 3] = (100.0, 90.0, -50.0)
    arr = np.zeros((40, 100, 100), np.int16)
    labelmap = Volume(arr, affine)
    for value, ras in ((5, LIVER_RAS), (13, SPLEEN_RAS)):
        i, j, k = np.rint(labelmap.ras_to_ijk_points(ras[None])[0]).astype(int)
        assert 2 <= min(i, j, k) and k < 38 and max(i, j) < 98
        arr[k - 2:k + 3, j - 2:j + 3, i - 2:i + 3] = value
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "TotalSeg labels")
    assert isinstance(node, vtkMRMLLabelMapVolumeNode)
    node.SetAndObserveImageData(image_data_from_array(arr))
    node.SetIJKToRASMatrix(numpy_to_matrix(affine))
    node.CreateDefaultDisplayNodes()
    colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "labels")
    colors.SetTypeToUser()
    colors.SetNumberOfColors(20)
    colors.SetColor(5, "liver", 0.8, 0.4, 0.3)
    colors.SetColor(13, "spleen_lobe", 0.6, 0.2, 0.6)
    node.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
    assert isinstance(colors, vtkMRMLColorTableNode)
    out = ScreeningLogic(scene).export(_result(ct), tmp_path / "out", segmentation=node)
    report = _report(out)
    assert report["anatomy_source"] == "labelmap 'TotalSeg labels'"
    assert [f["observations"]["structure"] for f in report["findings"]] == ["liver", "spleen lobe"]


def test_export_picks_the_segmentation_made_for_the_screened_volume(tmp_path):
    scene, ct_node, ct = _scene()
    logic = ScreeningLogic(scene)
    table = logic.add_result(_result(ct), ct_node)
    assert _report(logic.export(table, tmp_path / "none"))["anatomy_source"] == "relative position in the scan"
    hotspots = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MedAlign hotspots")  # MedAlign's own: no anatomy
    hotspots.SetAttribute("MedAlign.Role", "segmentation")
    hotspots.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
    _anatomy(scene, scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "other CT"), name="Other")  # another scan's
    seg = _anatomy(scene, ct_node, name="TotalSegmentator")
    report = _report(logic.export(table, tmp_path / "auto"))
    assert report["anatomy_source"] == "segmentation 'TotalSegmentator'"
    assert report["findings"][0]["observations"]["location"] == "in the liver"
    # an engine result (not a table) finds its input through the node id the screening recorded
    assert _report(logic.export(_result(ct, ct_node), tmp_path / "r"))["anatomy_source"] == "segmentation 'TotalSegmentator'"
    _anatomy(scene, ct_node, name="Manual")  # two made for this CT: not obvious, none picked, the report says so
    report = _report(logic.export(table, tmp_path / "two"))
    assert report["anatomy_source"] == "relative position in the scan"
    assert_one_sentence(ValueError(report["anatomy_note"]), "'TotalSegmentator'", "'Manual'", "Anatomy")
    # the one chosen wins over the scene's guess
    report = _report(logic.export(table, tmp_path / "chosen", segmentation=seg))
    assert report["anatomy_source"] == "segmentation 'TotalSegmentator'" and report["anatomy_note"] is None


def _empty_segment(scene, ct_node):
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Blank")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
    seg.GetSegmentation().AddEmptySegment("", "liver")
    return seg


def _unnamed_labelmap(scene, ct):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "Unnamed")
    node.SetAndObserveImageData(image_data_from_array((ct.array > 0).astype(np.int16) * 7))
    node.SetIJKToRASMatrix(numpy_to_matrix(ct.ijk_to_ras))
    return node  # no display node, so no colour table: no names


def _numbered_labelmap(scene, ct):
    """Labels named only by their numbers, as Slicer's default labelmap table (GenericColors) names them."""
    node = _unnamed_labelmap(scene, ct)
    node.SetName("Numbered")
    node.CreateDefaultDisplayNodes()
    colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "GenericColors")
    colors.SetTypeToUser()
    colors.SetNumberOfColors(10)
    for value in range(10):
        colors.SetColor(value, str(value), 0.1 * value, 0.5, 0.5)
    node.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
    return node


def _under_grid_transform(scene, ct_node):
    seg = _anatomy(scene, ct_node, name="Warped")
    seg.SetAndObserveTransformNodeID(scene.AddNewNodeByClass("vtkMRMLGridTransformNode").GetID())
    return seg


def _far_away(scene, ct_node):
    return _anatomy(scene, ct_node, name="Elsewhere", segments=(("liver", LIVER_RAS + [0, 0, 900.0]),))


BAD = {
    "no segments": (lambda scene, ct_node, ct: scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Nothing"),
                    ["'Nothing'", "no segments"]),
    "empty segment": (lambda scene, ct_node, ct: _empty_segment(scene, ct_node), ["'Blank'", "empty"]),
    "unnamed labels": (lambda scene, ct_node, ct: _unnamed_labelmap(scene, ct), ["'Unnamed'", "no names"]),
    "all-zero labelmap": (lambda scene, ct_node, ct: node_from_volume(
        scene, Volume(np.zeros((4, 4, 4), np.int16), np.eye(4)), "zeros", add=False), ["'zeros'"]),
    "numbered labels": (lambda scene, ct_node, ct: _numbered_labelmap(scene, ct), ["'Numbered'", "no names"]),
    "non-linear transform": (lambda scene, ct_node, ct: _under_grid_transform(scene, ct_node),
                             ["'Warped'", "non-linear transform"]),
    "no overlap": (lambda scene, ct_node, ct: _far_away(scene, ct_node), ["'Elsewhere'", "does not overlap"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_segmentation_is_one_sentence_in_the_report_and_the_status(case, tmp_path):
    scene, ct_node, ct = _scene()
    make, words = BAD[case]
    node = make(scene, ct_node, ct)
    if case == "all-zero labelmap":  # a grey volume node is no anatomy; a labelmap of zeros is empty
        from slicer import vtkMRMLLabelMapVolumeNode

        labelmap = vtkMRMLLabelMapVolumeNode()
        labelmap.SetName("zeros")
        labelmap.SetAndObserveImageData(node.GetImageData())
        scene.AddNode(labelmap)
        node = labelmap
    before = _node_ids(scene)
    out = ScreeningLogic(scene).export(_result(ct), tmp_path / "out", segmentation=node)
    report = _report(out)
    assert report["anatomy_source"] == "relative position in the scan"
    note = assert_one_sentence(ValueError(report["anatomy_note"]), *words)
    assert note.endswith("locations are given relative to the scan instead.")
    assert all(f["observations"]["location"].endswith("part of the scanned region") for f in report["findings"])
    assert note in (out / "report.html").read_text(encoding="utf-8").replace("&#x27;", "'")
    assert export_summary(out).endswith(note)
    assert _node_ids(scene) == before


def test_a_grey_volume_is_no_anatomy_and_errors_are_one_sentence():
    scene, ct_node, _ct = _scene()
    with pytest.raises(InputError) as err:
        segmentation_from_node(ct_node)
    assert_one_sentence(err.value, "'CT'", "neither a segmentation nor a labelmap")
    with pytest.raises(InputError) as err:
        segmentation_from_node(scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Nothing"))
    assert_one_sentence(err.value, "'Nothing'")
