"""The results panel's rules without Qt (``MedAlignLib.results_view``) on real slicer-core
scenes: table row -> finding, the overlay following the parameter node, a deleted map,
the CT selector's filter, and hotspot segments drawn by the engine's rule."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install 'trame-slicer[standalone]')")
pytest.importorskip("trame_slicer", reason="needs trame-slicer (pip install 'trame-slicer[standalone]')")

from helpers import new_app, synthetic_ct  # noqa: E402

from medalign.core.errors import InputError  # noqa: E402
from medalign.core.volume import Volume  # noqa: E402
from MedAlignLib import (  # noqa: E402
    DisplayController,
    ScreeningLogic,
    finding_at_view_row,
    first_screenable_volume,
    hidden_input_ids,
    is_screenable_volume,
    node_from_volume,
    results_view,
    threshold_value,
    volume_from_node,
)
from MedAlignLib import logic as glue  # noqa: E402

FINDINGS = ["Lung nodule", "Emphysema", "Pleural effusion"]


@pytest.fixture()
def screened():
    """A fresh scene with one synthetic CT screened, three slice composite nodes and the
    module's parameter node (a vtkMRMLScriptedModuleNode, as the parameterNodeWrapper keeps it)."""
    from helpers import tiny_test_model

    app = new_app()
    node = node_from_volume(app.scene, synthetic_ct(blob_ras=(20.0, 30.0, -10.0)), "synthetic CT")
    logic = ScreeningLogic(app.scene)
    result = logic.screen(node, findings=FINDINGS, model=tiny_test_model(seed=0), device="cpu")
    composites = [app.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    parameters = app.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "MedAlign")
    parameters.SetAttribute("ModuleName", "MedAlign")
    return {"app": app, "scene": app.scene, "node": node, "logic": logic, "result": result,
            "table": logic.last_table, "composites": composites, "parameters": parameters}


def controller_for(screened):
    messages: list[str] = []
    controller = DisplayController(screened["logic"], screened["parameters"], messages.append)
    screened["parameters"].SetNodeReferenceID(results_view.RESULT_TABLE, screened["table"].GetID())
    return controller, messages


def foreground(screened) -> set[tuple[str, float]]:
    return {(c.GetForegroundVolumeID(), round(c.GetForegroundOpacity(), 6)) for c in screened["composites"]}


# ---------------------------------------------------------------------- table rows
def test_results_table_has_a_header_is_locked_and_row_k_is_finding_k(screened):
    table, ranked = screened["table"], screened["result"].ranked()
    assert table.GetUseColumnTitleAsColumnHeader() and table.GetLocked()
    assert [finding_at_view_row(table, k) for k in range(len(ranked))] == [f.name for f in ranked]
    assert finding_at_view_row(table, len(ranked)) is None and finding_at_view_row(table, -1) is None


def test_a_table_without_the_header_flag_still_maps_rows_to_findings(screened):
    """Tables of older saved scenes show the column names as the view's row 0."""
    table, ranked = screened["table"], screened["result"].ranked()
    table.SetUseColumnTitleAsColumnHeader(False)
    assert finding_at_view_row(table, 0) is None
    assert [finding_at_view_row(table, k + 1) for k in range(len(ranked))] == [f.name for f in ranked]


# ---------------------------------------------------------------------- overlay
def test_display_follows_the_new_parameter_values(screened):
    controller, messages = controller_for(screened)
    maps = screened["logic"].map_nodes()
    parameters = screened["parameters"]
    controller.show("Emphysema")
    assert foreground(screened) == {(maps["Emphysema"].GetID(), 0.5)}
    parameters.SetParameter(results_view.OPACITY, "0.8")  # as the slider's connector writes it
    assert foreground(screened) == {(maps["Emphysema"].GetID(), 0.8)}
    parameters.SetParameter(results_view.THRESHOLD, "0.9")
    lo, hi = maps["Emphysema"].GetImageData().GetScalarRange()
    assert maps["Emphysema"].GetDisplayNode().GetLowerThreshold() == pytest.approx(threshold_value(lo, hi, 0.9))
    parameters.SetParameter(results_view.SHOWN_FINDING, "Lung nodule")
    assert foreground(screened) == {(maps["Lung nodule"].GetID(), 0.8)}
    assert messages == []
    controller.close()
    parameters.SetParameter(results_view.OPACITY, "0.2")  # no longer followed
    assert foreground(screened) == {(maps["Lung nodule"].GetID(), 0.8)}


def test_showing_the_shown_finding_again_reapplies_it(screened):
    controller, _messages = controller_for(screened)
    controller.show("Emphysema")
    for composite in screened["composites"]:
        composite.SetForegroundVolumeID(None)  # the user put something else in the views
    controller.show("Emphysema")
    assert foreground(screened) == {(screened["logic"].map_node("Emphysema").GetID(), 0.5)}


def test_entering_the_module_leaves_the_views_alone_until_the_state_changes(screened):
    """A parameter node from a saved scene already names a finding: no redraw on unrelated events."""
    parameters = screened["parameters"]
    parameters.SetNodeReferenceID(results_view.RESULT_TABLE, screened["table"].GetID())
    parameters.SetParameter(results_view.SHOWN_FINDING, "Emphysema")
    controller = DisplayController(screened["logic"], parameters, lambda message: None)
    parameters.SetParameter("findings", "Lung nodule")
    assert {volume for volume, _opacity in foreground(screened)} == {None}
    parameters.SetParameter(results_view.OPACITY, "0.7")
    assert foreground(screened) == {(screened["logic"].map_node("Emphysema").GetID(), 0.7)}
    controller.close()


def test_a_deleted_map_gives_one_message_and_keeps_the_row(screened):
    controller, messages = controller_for(screened)
    scene, table, parameters = screened["scene"], screened["table"], screened["parameters"]
    rows = [finding_at_view_row(table, k) for k in range(table.GetNumberOfRows())]
    scene.RemoveNode(screened["logic"].map_node("Emphysema"))
    controller.show("Emphysema")
    assert messages == ["The map of 'Emphysema' is no longer in the scene; screen the volume again to see it."]
    for _ in range(5):  # later parameter node events with the same display state: no new message
        parameters.SetParameter("findings", f"{_}")
        parameters.Modified()
    assert len(messages) == 1
    assert [finding_at_view_row(table, k) for k in range(table.GetNumberOfRows())] == rows  # the row stays
    controller.show("Lung nodule")  # the other rows still work
    assert len(messages) == 1 and foreground(screened) == {(screened["logic"].map_node("Lung nodule").GetID(), 0.5)}


# ---------------------------------------------------------------------- CT selector
def test_ct_selector_hides_medalign_maps(screened):
    scene, node = screened["scene"], screened["node"]
    maps = screened["logic"].map_nodes()
    assert is_screenable_volume(node)
    assert not any(is_screenable_volume(m) for m in maps.values())
    assert sorted(hidden_input_ids(scene)) == sorted(m.GetID() for m in maps.values())
    other = new_app()
    logic = ScreeningLogic(other.scene)
    from helpers import tiny_test_model

    ct = node_from_volume(other.scene, synthetic_ct(), "CT")
    logic.screen(ct, findings=["Atelectasis"], model=tiny_test_model(seed=0), device="cpu")
    map_node = logic.map_node("Atelectasis")
    other.scene.RemoveNode(ct)
    later = node_from_volume(other.scene, synthetic_ct(), "later CT")  # added after the map
    assert first_screenable_volume(other.scene) is later
    with pytest.raises(InputError, match="is a MedAlign alignment map, not a CT"):
        logic.screen(map_node, findings=["Atelectasis"], model=tiny_test_model(seed=0), device="cpu")


# ---------------------------------------------------------------------- hotspot segments
def map_node_of(scene, array: np.ndarray, name: str):
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    node = node_from_volume(scene, Volume(array.astype(np.float32), affine), f"map {name}")
    node.SetAttribute(glue.ROLE, "map")
    node.SetAttribute(glue.FINDING, name)
    return node


def segment_voxels(segmentation_node, segment_id) -> int:
    from slicer import vtkOrientedImageData
    from vtk.util import numpy_support

    labelmap = vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    return int(numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).sum())


@pytest.mark.parametrize("fraction", [None, 0.3, 0.7])
def test_hotspot_segment_is_the_engines_hotspot_region(fraction):
    from medalign.inference.screener import hotspot_of

    app = new_app()
    logic = ScreeningLogic(app.scene)
    k, j, i = np.meshgrid(np.arange(12), np.arange(14), np.arange(16), indexing="ij")
    array = np.exp(-((k - 5) ** 2 + (j - 6) ** 2 + (i - 9) ** 2) / 8.0) - 0.2
    array[0, 0, 0:3] = 0.9  # a second, separate bright region the segment must not take
    node = map_node_of(app.scene, array, "Gaussian")
    seg, segment_id = logic.hotspot_to_segment(node, threshold=fraction)
    engine = hotspot_of(volume_from_node(node)) if fraction is None else hotspot_of(volume_from_node(node), fraction)
    assert segment_voxels(seg, segment_id) * 2.0 * 2.0 * 3.0 == pytest.approx(engine.extent_mm3)


def test_a_map_without_a_hotspot_gives_no_segment():
    """All values below zero: what the engine's hotspot rule says is what the segment does."""
    from medalign.inference.screener import hotspot_of

    app = new_app()
    logic = ScreeningLogic(app.scene)
    k, j, i = np.meshgrid(np.arange(10), np.arange(10), np.arange(10), indexing="ij")
    array = -1.0 - 0.05 * (k + j + i)  # a gradient, peak (-1.0) at voxel (0, 0, 0)
    node = map_node_of(app.scene, array, "Negative")
    engine = hotspot_of(volume_from_node(node))
    if engine is None:  # the engine's rule since issue 22 item 8
        nodes_before = app.scene.GetNumberOfNodes()
        with pytest.raises(InputError, match="has no positive value"):
            logic.hotspot_to_segment(node)
        assert app.scene.GetNumberOfNodes() == nodes_before
    else:
        seg, segment_id = logic.hotspot_to_segment(node)
        assert segment_voxels(seg, segment_id) * 2.0 * 2.0 * 3.0 == pytest.approx(engine.extent_mm3)
