"""MRML glue (``MedAlignLib``) on real slicer-core scenes: nodes, display, segments, saving,
cancelling and the background process. Skips cleanly where slicer-core is not installed."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install 'trame-slicer[standalone]')")
pytest.importorskip("trame_slicer", reason="needs trame-slicer (pip install 'trame-slicer[standalone]')")

import vtk  # noqa: E402
from helpers import new_app, synthetic_ct, tiny_checkpoint  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from medalign.core.errors import CancelledError, InputError, MedAlignError  # noqa: E402
from medalign.core.volume import Volume  # noqa: E402
from medalign.models.calibration import Calibration, FindingCalibration  # noqa: E402
from MedAlignLib import (  # noqa: E402
    TABLE_COLUMNS,
    BackgroundScreening,
    ScreeningLogic,
    describe_location,
    ensure_color_node,
    inferno_rgb,
    node_from_volume,
    threshold_value,
    volume_from_node,
)
from MedAlignLib import logic as glue  # noqa: E402
from MedAlignLib.nodes import matrix_to_numpy  # noqa: E402

FINDINGS = ["Lung nodule", "Emphysema", "Pleural effusion"]


def node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def voxel_digest(node) -> str:
    scalars = node.GetImageData().GetPointData().GetScalars()
    return hashlib.sha256(numpy_support.vtk_to_numpy(scalars).tobytes()).hexdigest()


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return matrix_to_numpy(m)


@pytest.fixture(scope="module")
def tiny():
    from helpers import tiny_test_model

    model = tiny_test_model(seed=0)
    # as calibration leaves them: emphysema clears its threshold but was near chance on held-out data
    model.calibration = Calibration({
        "Emphysema": FindingCalibration(threshold=0.0, heldout_auc=0.55),
        "Lung nodule": FindingCalibration(threshold=0.0, heldout_auc=0.92),
    })
    return model


@pytest.fixture(scope="module")
def screened(tiny):
    """One synthetic CT screened in a real scene; shared by the read-mostly tests."""
    app = new_app()
    volume = synthetic_ct(blob_ras=(20.0, 30.0, -10.0))
    node = node_from_volume(app.scene, volume, "synthetic CT")
    before = (voxel_digest(node), ijk_to_ras(node), node.GetImageData().GetScalarType())
    logic = ScreeningLogic(app.scene)
    calls: list[tuple[float, str]] = []
    result = logic.screen(node, findings=FINDINGS, model=tiny, device="cpu", progress=lambda f, m: calls.append((f, m)))
    return {"app": app, "node": node, "logic": logic, "result": result, "before": before, "calls": calls,
            "table": logic.last_table, "volume": volume}


# ---------------------------------------------------------------------- volumes
def test_node_volume_round_trip_copies_and_keeps_geometry():
    app = new_app()
    rng = np.random.default_rng(3)
    array = rng.integers(-1000, 1500, size=(7, 9, 11)).astype(np.int32)
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.array([[-0.8 * c, 0.8 * s, 0, 12.5], [-0.8 * s, -0.8 * c, 0, -40.0], [0, 0, 2.5, 300.0], [0, 0, 0, 1]])
    node = node_from_volume(app.scene, Volume(array, affine), "oblique")
    back = volume_from_node(node)
    assert back.array.dtype == np.int16  # int32 HU that fit are handed over as int16, never float64
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_allclose(back.ijk_to_ras, affine, atol=1e-9)
    # a voxel index maps to the same RAS point through the node and through the Volume
    ijk = np.array([[3, 5, 2], [10, 0, 6]])
    node_ras = [np.array(ijk_to_ras(node) @ np.r_[p, 1.0])[:3] for p in ijk]
    np.testing.assert_allclose(node_ras, back.ijk_to_ras_points(ijk), atol=1e-9)
    # copies both ways: changing the Volume never touches the node
    back.array[:] = 0
    assert volume_from_node(node).array.max() > 0
    assert back.metadata["name"] == "oblique"


def test_linear_parent_transform_is_applied_and_nonlinear_refused():
    app = new_app()
    node = node_from_volume(app.scene, Volume(np.zeros((8, 8, 8), np.int16), np.eye(4)), "t")
    transform = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 10.0)
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    assert volume_from_node(node).ijk_to_ras[0, 3] == pytest.approx(10.0)
    grid = app.scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(InputError, match="non-linear transform"):
        volume_from_node(node)


def test_node_without_voxels_is_one_sentence_error():
    app = new_app()
    empty = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="no voxel data"):
        volume_from_node(empty)


def test_real_ct_node_matches_engine_reader(real_ct):
    """slicer-core's reader and the engine's reader agree on voxels and geometry."""
    from medalign.core.volume_io import read_volume

    path = real_ct / "abdomen_ct_3mm.nii.gz"
    app = new_app()
    (node,) = app.io_manager.load_volumes([str(path)])
    from_node = volume_from_node(node)
    from_file = read_volume(path)
    np.testing.assert_array_equal(from_node.array, from_file.array)
    np.testing.assert_allclose(from_node.ijk_to_ras, from_file.ijk_to_ras, atol=1e-4)


# ---------------------------------------------------------------------- colours
def test_inferno_polynomial_is_perceptual_and_close_to_matplotlib():
    rgb = inferno_rgb(256)
    luminance = rgb @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(luminance) > 0)  # strictly brighter: a perceptual sequential map
    matplotlib = pytest.importorskip("matplotlib")
    reference = matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3]
    assert np.abs(rgb - reference).max() < 0.03


def test_color_node_created_once_and_slicer_inferno_preferred():
    app = new_app()
    first = ensure_color_node(app.scene)
    assert first.GetName() == "MedAlign Inferno" and first.GetNumberOfColors() == 256
    assert first.GetStorageNode() is not None  # saved with the scene
    assert ensure_color_node(app.scene) is first
    other = new_app()
    real = other.scene.AddNewNodeByClass("vtkMRMLColorTableNode", "Inferno")
    assert ensure_color_node(other.scene) is real


# ---------------------------------------------------------------------- screening -> nodes
def test_table_rows_match_engine_result(screened):
    result, table = screened["result"], screened["table"]
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == list(TABLE_COLUMNS)
    assert table.GetNumberOfRows() == len(FINDINGS)
    ranked = result.ranked()
    probabilities = []
    for row, f in enumerate(ranked):
        assert table.GetCellText(row, 0) == f.name
        values = {name: table.GetTable().GetValueByName(row, name) for name in TABLE_COLUMNS}
        assert values["probability"].ToDouble() == pytest.approx(f.probability)
        assert values["uncertainty"].ToDouble() == pytest.approx(f.uncertainty)
        unvalidated = ("flagged" if f.probability >= 0.5 else "", None)  # no calibration: threshold 0.5
        expected = {"Lung nodule": ("flagged", 0.92), "Emphysema": ("near chance", 0.55)}.get(f.name, unvalidated)
        assert values["flag"].ToString() == expected[0]
        if expected[1] is None:
            assert math.isnan(values["held-out AUC"].ToDouble())
        else:
            assert values["held-out AUC"].ToDouble() == pytest.approx(expected[1])
        # a map with no positive value has no hotspot (medalign.inference.hotspot): NaN cells
        where = (*f.hotspot.ras, f.hotspot.extent_mm3) if f.hotspot is not None else (math.nan,) * 4
        for column, value in zip(("hotspot R", "hotspot A", "hotspot S", "extent_mm3"), where):
            assert values[column].ToDouble() == pytest.approx(value, nan_ok=True)
        probabilities.append(f.probability)
    assert probabilities == sorted(probabilities, reverse=True)
    assert sorted(f.name for f in result.findings) == sorted(FINDINGS)
    assert screened["calls"][0][0] == 0.0 and screened["calls"][-1][0] == 1.0


def test_map_nodes_share_the_engine_maps_geometry_and_values(screened):
    logic, result = screened["logic"], screened["result"]
    maps = logic.map_nodes()
    assert set(maps) == set(FINDINGS)
    for f in result.findings:
        node = maps[f.name]
        engine_map = f.map
        shape = engine_map.array.shape
        assert node.GetImageData().GetDimensions() == engine_map.shape_ijk
        m = ijk_to_ras(node)
        for ijk in ([0, 0, 0], [shape[2] - 1, shape[1] // 2, shape[0] - 1], [3, 1, 2]):
            np.testing.assert_allclose((m @ np.r_[ijk, 1.0])[:3], engine_map.ijk_to_ras_points(np.array([ijk]))[0],
                                       atol=1e-6)
        np.testing.assert_array_equal(volume_from_node(node).array, engine_map.array)
        display = node.GetDisplayNode()
        assert display.GetColorNode().GetNumberOfColors() == 256
        assert display.GetApplyThreshold()
        lowest = f.hotspot.threshold if f.hotspot is not None else glue.threshold_value(
            float(np.nanmin(engine_map.array)), float(np.nanmax(engine_map.array)), 0.5)
        assert display.GetLowerThreshold() == pytest.approx(lowest)
        assert node.GetNodeReference(glue.REF_INPUT) is screened["node"]


def test_input_node_is_unchanged(screened):
    node = screened["node"]
    digest, matrix, scalar_type = screened["before"]
    assert voxel_digest(node) == digest
    np.testing.assert_array_equal(ijk_to_ras(node), matrix)
    assert node.GetImageData().GetScalarType() == scalar_type


def test_results_sit_under_the_input_in_the_subject_hierarchy(screened):
    scene, node, table = screened["app"].scene, screened["node"], screened["table"]
    sh = scene.GetSubjectHierarchyNode()
    folder = sh.GetItemParent(sh.GetItemByDataNode(table))
    assert sh.GetItemParent(folder) == sh.GetItemByDataNode(node)
    children = vtk.vtkIdList()
    sh.GetItemChildren(folder, children)
    data = {sh.GetItemDataNode(children.GetId(i)).GetID() for i in range(children.GetNumberOfIds())}
    assert data == {table.GetID()} | {n.GetID() for n in screened["logic"].map_nodes().values()}


def test_show_map_sets_every_slice_view(screened):
    scene, logic = screened["app"].scene, screened["logic"]
    composites = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    try:
        shown = logic.show_map("Emphysema", opacity=0.35, threshold=0.8)
        for composite in composites:
            assert composite.GetBackgroundVolumeID() == screened["node"].GetID()
            assert composite.GetForegroundVolumeID() == shown.GetID()
            assert composite.GetForegroundOpacity() == pytest.approx(0.35)
        lo, hi = shown.GetImageData().GetScalarRange()
        assert shown.GetDisplayNode().GetLowerThreshold() == pytest.approx(threshold_value(lo, hi, 0.8))
        legend = next(
            shown.GetNthDisplayNode(i) for i in range(shown.GetNumberOfDisplayNodes())
            if shown.GetNthDisplayNode(i).IsA("vtkMRMLColorLegendDisplayNode")
        )
        assert legend.GetVisibility() and legend.GetTitleText() == "Emphysema"
        # showing another finding moves the overlay and hides the first legend
        other = logic.show_map(logic.map_node("Lung nodule"), opacity=0.6)
        assert all(c.GetForegroundVolumeID() == other.GetID() for c in composites)
        assert not legend.GetVisibility()
    finally:
        for composite in composites:
            scene.RemoveNode(composite)


def test_hotspot_becomes_a_segment_at_the_map_peak(screened):
    from slicer import vtkOrientedImageData

    logic = screened["logic"]
    first, second = "Lung nodule", "Emphysema"
    # The tiny random model's maps may hold no positive value, and such a map has no hotspot
    # (test_results_view covers that). Lift both maps above zero (the peak stays in place)
    # and put them back afterwards: the scene is shared by this module's tests.
    lifted = {}
    for name in (first, second):
        voxels = numpy_support.vtk_to_numpy(logic.map_node(name).GetImageData().GetPointData().GetScalars())
        lifted[name] = (voxels, voxels.copy())
        voxels += np.float32(1.0 - voxels.min())
        logic.map_node(name).GetImageData().Modified()
    try:
        seg_node, segment_id = logic.hotspot_to_segment(first)
        engine_map = screened["result"].finding(first).map
        labelmap = vtkOrientedImageData()
        seg_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
        world_to_image = vtk.vtkMatrix4x4()
        labelmap.GetWorldToImageMatrix(world_to_image)
        peak_ijk = np.unravel_index(int(np.argmax(engine_map.array)), engine_map.array.shape)[::-1]
        peak_ras = engine_map.ijk_to_ras_points(np.array([peak_ijk]))[0]
        ijk = np.rint((matrix_to_numpy(world_to_image) @ np.r_[peak_ras, 1.0])[:3]).astype(int)
        extent = labelmap.GetExtent()
        assert all(extent[2 * a] <= ijk[a] <= extent[2 * a + 1] for a in range(3))
        assert labelmap.GetScalarComponentAsDouble(*ijk, 0) == 1
        segmentation = seg_node.GetSegmentation()
        assert segmentation.GetSegment(segment_id).GetName() == first
        # again: the segment is replaced, not duplicated; another finding extends the same node
        seg_again, _ = logic.hotspot_to_segment(first)
        seg_other, other_id = logic.hotspot_to_segment(second)
        assert seg_again is seg_node and seg_other is seg_node
        names = sorted(segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments()))
        assert names == sorted([first, second])
    finally:
        for name, (voxels, original) in lifted.items():
            voxels[:] = original
            logic.map_node(name).GetImageData().Modified()


def test_cancel_mid_run_leaves_the_scene_unchanged(screened, tiny):
    scene, node = screened["app"].scene, screened["node"]
    ids_before = node_ids(scene)
    items_before = scene.GetSubjectHierarchyNode().GetNumberOfItems()
    calls = []
    with pytest.raises(CancelledError):
        screened["logic"].screen(node, findings=FINDINGS, model=tiny, device="cpu",
                                 progress=lambda f, m: calls.append(f), cancel=lambda: len(calls) >= 1)
    assert len(calls) == 1
    assert node_ids(scene) == ids_before
    assert scene.GetSubjectHierarchyNode().GetNumberOfItems() == items_before


def test_failure_while_adding_nodes_rolls_everything_back(tiny, monkeypatch):
    app = new_app()
    node = node_from_volume(app.scene, synthetic_ct(), "ct")
    logic = ScreeningLogic(app.scene)
    from medalign.inference.screener import screen

    result = screen(volume_from_node(node), findings=["Atelectasis"], model=tiny, device="cpu")
    ids_before, items_before = node_ids(app.scene), app.scene.GetSubjectHierarchyNode().GetNumberOfItems()

    def broken(*_args, **_kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ScreeningLogic, "_place_in_hierarchy", staticmethod(broken))
    with pytest.raises(RuntimeError, match="disk full"):
        logic.add_result(result, node)
    assert node_ids(app.scene) == ids_before  # colour table, maps, storage, display and table all gone
    assert app.scene.GetSubjectHierarchyNode().GetNumberOfItems() == items_before
    # cancel requested after the engine finished but before nodes are added: nothing is added either
    monkeypatch.undo()
    with pytest.raises(CancelledError):
        logic.add_result(result, node, cancel=lambda: True)
    assert node_ids(app.scene) == ids_before


def test_saved_scene_reloads_with_results_and_parameters(screened, tmp_path):
    app, result = screened["app"], screened["result"]
    parameters = app.scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "MedAlign")
    parameters.SetAttribute("ModuleName", "MedAlign")
    parameters.SetParameter("opacity", "0.35")
    parameters.SetParameter("findings", json.dumps(FINDINGS))
    parameters.SetNodeReferenceID("inputVolume", screened["node"].GetID())
    parameters.SetNodeReferenceID("resultTable", screened["table"].GetID())
    bundle = tmp_path / "scene.mrb"
    assert app.io_manager.save_scene(bundle)
    app.scene.RemoveNode(parameters)

    other = new_app()
    reloaded_logic = ScreeningLogic(other.scene)  # registers the node classes a bare scene lacks
    assert other.io_manager.load_scene(bundle)
    (table,) = reloaded_logic.results_tables()
    assert table.GetNumberOfRows() == len(FINDINGS)
    assert table.GetUseColumnTitleAsColumnHeader() and table.GetLocked()  # saved with the scene
    assert json.loads(table.GetAttribute(glue.PARAMETERS_JSON))["findings"] == [f.name for f in result.findings]
    again = reloaded_logic.result_from_table(table)
    assert [(f.name, f.probability, f.flagged) for f in again.ranked()] == [
        (f.name, pytest.approx(f.probability, abs=1e-6), f.flagged) for f in result.ranked()]
    for f in result.findings:
        reloaded_map = again.finding(f.name).map
        np.testing.assert_array_equal(reloaded_map.array, f.map.array)
        np.testing.assert_allclose(reloaded_map.ijk_to_ras, f.map.ijk_to_ras, atol=1e-5)
        node = reloaded_logic.map_node(f.name, table)
        assert node.GetDisplayNode().GetColorNode().GetNumberOfColors() == 256
        stored = json.loads(node.GetAttribute(glue.HOTSPOT_JSON))
        assert (stored and stored["threshold"]) == (f.hotspot and pytest.approx(f.hotspot.threshold))
    input_node = table.GetNodeReference(glue.REF_INPUT)
    assert input_node.GetName() == "synthetic CT"
    assert voxel_digest(input_node) == screened["before"][0]
    params = other.scene.GetFirstNodeByName("MedAlign")
    assert params.GetParameter("opacity") == "0.35"
    assert json.loads(params.GetParameter("findings")) == FINDINGS
    assert params.GetNodeReference("inputVolume").GetID() == input_node.GetID()
    assert params.GetNodeReference("resultTable").GetID() == table.GetID()


def test_export_writes_report_results_and_maps(screened, tmp_path):
    from medalign.core.volume_io import read_volume

    out = screened["logic"].export(screened["table"], tmp_path / "export")
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [e["finding"] for e in report["findings"]] == [f.name for f in screened["result"].ranked()]
    for entry in report["findings"]:
        assert entry["definition"]  # CT-RATE findings have knowledge-base definitions
        f = screened["result"].finding(entry["finding"])
        assert entry["verdict"] == ("flagged" if f.flagged else "not flagged: near chance on held-out data"
                                    if f.name == "Emphysema" else "not flagged")
        assert entry["validation_auc"] == f.validation_auc
        assert 0.0 <= entry["probability"] <= 1.0
        if f.hotspot is None:  # a map with no positive value points nowhere
            assert entry["evidence"] is None
            continue
        assert "scanned region" in entry["evidence"]["location"]
        saved = read_volume(out / entry["evidence"]["map"])
        node = screened["logic"].map_node(entry["finding"])
        np.testing.assert_allclose(saved.ijk_to_ras, ijk_to_ras(node), atol=1e-4)
    assert (out / "report.csv").read_text(encoding="utf-8").startswith("finding,verdict,probability")
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["model"] == screened["result"].model
    assert not [p for p in out.rglob(".tmp-*")]


def test_describe_location_uses_patient_directions():
    bounds = (np.array([-100.0, -100.0, 0.0]), np.array([100.0, 100.0, 300.0]))
    assert describe_location((90, -90, 290), bounds) == "patient-right, posterior, upper part of the scanned region"
    assert describe_location((-90, 0, 10), bounds) == "patient-left, mid-coronal, lower part of the scanned region"


def test_real_chest_ct_screens_without_touching_the_input(real_ct, tiny):
    app = new_app()
    (node,) = app.io_manager.load_volumes([str(real_ct / "chest_ct_lung_mass.nii.gz")])
    digest = voxel_digest(node)
    logic = ScreeningLogic(app.scene)
    result = logic.screen(node, findings=["Lung nodule"], model=tiny, device="cpu")
    assert voxel_digest(node) == digest
    lo, hi = volume_from_node(node).ras_bounds()
    map_node = logic.map_node("Lung nodule")
    mlo, mhi = volume_from_node(map_node).ras_bounds()
    spacing = np.array(map_node.GetSpacing())
    # the map covers the input's RAS extent (to within one map voxel)
    assert np.all(mlo <= lo + spacing) and np.all(mhi >= hi - spacing)
    assert logic.last_table.GetCellText(0, 0) == result.findings[0].name


def test_console_screen_takes_an_adapter_and_refuses_another_models_in_one_sentence(tiny_model, tmp_path):
    """``logic.screen(node, adapter=FILE)`` from the Python console: the adapter's scores
    reach the table, which records the file; another model's adapter leaves the scene as it was."""
    from helpers import assert_adapted_scores, assert_one_sentence, lung_nodule_adapter

    from medalign.core.errors import CheckpointError
    from medalign.models import registry

    app = new_app()
    node = node_from_volume(app.scene, synthetic_ct(), "synthetic CT")
    logic = ScreeningLogic(app.scene)
    own = lung_nodule_adapter(tmp_path / "site.safetensors", tiny_model, registry.get(tiny_model).sha256)
    result = logic.screen(node, findings=FINDINGS, model=tiny_model, device="cpu", adapter=str(own))
    assert_adapted_scores(result, volume_from_node(node), tiny_model, FINDINGS, own, tol=1e-5)
    assert json.loads(logic.last_table.GetAttribute(glue.PARAMETERS_JSON))["adapter"] == str(own)

    foreign = lung_nodule_adapter(tmp_path / "ctclip.safetensors", "ct-clip", "ab" * 32)
    before = node_ids(app.scene)
    with pytest.raises(CheckpointError) as refusal:
        logic.screen(node, findings=FINDINGS, model=tiny_model, device="cpu", adapter=foreign)
    assert_one_sentence(refusal.value, "trained for model 'ct-clip'", f"not for '{tiny_model}'")
    assert node_ids(app.scene) == before


# ---------------------------------------------------------------------- background process
def test_progress_parser_handles_split_chunks_and_noise():
    job = BackgroundScreening(None, work_dir="/nonexistent-medalign")
    assert job.feed("MEDALIGN-PROGRESS 0.1000 pre") == []
    assert job.feed("processing\nnoise line\nMEDALIGN-PROGRESS 0.5 scoring Lung nodule\r\nMEDALI") == [
        (0.1, "preprocessing"), (0.5, "scoring Lung nodule")]
    assert job.feed("GN-PROGRESS 1.0 done\n") == [(1.0, "done")]
    assert (job.fraction, job.message) == (1.0, "done")
    assert BackgroundScreening.error_message("Traceback...\nmedalign: error: x.nii is not CT.\n") == "x.nii is not CT."
    with pytest.raises(MedAlignError, match="cannot contain"):
        BackgroundScreening(None, findings=["a;b"], work_dir="/nonexistent-medalign").findings_argument()


@pytest.fixture()
def registered_tiny(tmp_path, monkeypatch):
    """A tiny checkpoint registered as model 'tiny' in a private MEDALIGN_HOME."""
    from medalign.models import registry
    from medalign.models.download import sha256_file

    monkeypatch.setenv("MEDALIGN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEDALIGN_OFFLINE", "1")
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")
    registry.add("tiny", ckpt, sha256_file(ckpt))
    return "tiny"


def run_job(job: BackgroundScreening, kill_after_first_progress: bool = False):
    proc = subprocess.Popen(job.command(), env=job.environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    updates, killed = [], False
    for line in proc.stdout:
        updates += job.feed(line)
        if kill_after_first_progress and updates and not killed:
            proc.kill()
            killed = True
    stderr = proc.stderr.read()
    return proc.wait(timeout=120), stderr, updates


def test_background_screening_subprocess_end_to_end(registered_tiny):
    app = new_app()
    node = node_from_volume(app.scene, synthetic_ct(shape_kji=(24, 40, 40), spacing=(7.0, 7.0, 8.0)), "bg CT")
    logic = ScreeningLogic(app.scene)
    job = BackgroundScreening(node, findings=["Lung nodule", "Atelectasis"], model=registered_tiny, device="cpu")
    argv = job.command()
    assert argv[1:4] == ["-m", "medalign.cli", "screen"] and "--progress-lines" in argv
    from medalign.core.volume_io import read_volume

    written = read_volume(job.input_path)  # the NRRD handed to the child is the node, voxel for voxel
    np.testing.assert_array_equal(written.array, volume_from_node(node).array)
    np.testing.assert_allclose(written.ijk_to_ras, volume_from_node(node).ijk_to_ras, atol=1e-5)

    code, stderr, updates = run_job(job)
    assert code == 0, stderr
    fractions = [f for f, _ in updates]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    table = job.finish(code, stderr, logic)
    assert table.GetNumberOfRows() == 2
    assert {table.GetCellText(r, 0) for r in range(2)} == {"Lung nodule", "Atelectasis"}
    assert set(logic.map_nodes(table)) == {"Lung nodule", "Atelectasis"}
    assert not job.work_dir.exists()


def test_background_failure_and_kill_create_nothing(registered_tiny):
    app = new_app()
    node = node_from_volume(app.scene, synthetic_ct(shape_kji=(24, 40, 40), spacing=(7.0, 7.0, 8.0)), "bg CT")
    logic = ScreeningLogic(app.scene)
    ids = node_ids(app.scene)

    bad = BackgroundScreening(node, findings=["Lung nodule"], model="no-such-model", device="cpu")
    code, stderr, _ = run_job(bad)
    assert code == 2
    with pytest.raises(MedAlignError, match="no-such-model"):
        bad.finish(code, stderr, logic)
    assert node_ids(app.scene) == ids and not bad.work_dir.exists()

    killed = BackgroundScreening(node, findings=["Lung nodule"], model=registered_tiny, device="cpu")
    code, stderr, updates = run_job(killed, kill_after_first_progress=True)
    assert updates and code != 0
    with pytest.raises(CancelledError):  # the user's cancel; an unrequested kill is a crash (test_run_controller)
        killed.finish(code, stderr, logic, cancelled=True)
    assert node_ids(app.scene) == ids and not killed.work_dir.exists()


def test_environment_puts_the_engine_first_on_pythonpath():
    job = BackgroundScreening(None, work_dir="/nonexistent-medalign")
    env = job.environment({"PYTHONPATH": "/elsewhere"})
    first = env["PYTHONPATH"].split(os.pathsep)[0]
    assert os.path.isfile(os.path.join(first, "medalign", "__init__.py"))
    assert env["PYTHONPATH"].endswith("/elsewhere") and env["PYTHONUNBUFFERED"] == "1"
    assert sys.executable in BackgroundScreening(None, work_dir="/nonexistent-medalign").python


def test_coverage_warnings_travel_through_the_results_table(screened):
    """The panel's status line reads the warnings back from the table the engine's result made."""
    import dataclasses

    logic, node = screened["logic"], screened["node"]
    warned = dataclasses.replace(screened["result"], warnings=["Only 2% of the scan's slices show lung."])
    table = logic.add_result(warned, node)
    try:
        assert logic.result_from_table(table, load_maps=False).warnings == warned.warnings
    finally:
        for map_node in logic.map_nodes(table).values():
            screened["app"].scene.RemoveNode(map_node)
        screened["app"].scene.RemoveNode(table)


# ---------------------------------------------------------------------- the map in 3D
def test_map_surface_lies_where_the_map_crosses_the_level_in_ras():
    """A ball-shaped map on a flipped, anisotropic grid: its surface is a sphere of the
    ball's radius around the ball's RAS centre (the IJK-to-RAS placement is right)."""
    from MedAlignLib.map_surface import surface_polydata

    app = new_app()
    spacing, centre_ras, radius = (2.0, 3.0, 4.0), np.array([12.0, -30.0, 25.0]), 20.0
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [60.0, 40.0, -20.0]
    shape_kji = (30, 40, 50)
    grid = Volume(np.zeros(shape_kji, np.float32), affine)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape_kji], indexing="ij")
    ras = grid.ijk_to_ras_points(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))
    grid.array = (radius - np.linalg.norm(ras - centre_ras, axis=1)).reshape(shape_kji).astype(np.float32)
    map_node = node_from_volume(app.scene, grid, "ball map")
    points = numpy_support.vtk_to_numpy(surface_polydata(map_node, 0.0).GetPoints().GetData())
    distances = np.linalg.norm(points - centre_ras, axis=1)
    assert len(points) > 500 and np.abs(distances - radius).max() < 0.5


def ball_values(map_node, centre_ras: np.ndarray, radius: float) -> np.ndarray:
    """[flat] values ``radius - distance to centre_ras`` on ``map_node``'s voxel grid."""
    ni, nj, nk = map_node.GetImageData().GetDimensions()
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    ijk1 = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)], axis=1)
    ras = (ijk_to_ras(map_node) @ ijk1.T).T[:, :3]
    return (radius - np.linalg.norm(ras - centre_ras, axis=1)).astype(np.float32)


def test_shown_map_is_a_surface_in_3d_that_follows_the_overlay(screened):
    from MedAlignLib.map_surface import SURFACE_ROLE, surface_of

    scene, logic = screened["app"].scene, screened["logic"]
    first, second = "Lung nodule", "Emphysema"
    centre = {first: np.array([20.0, 30.0, -10.0]), second: np.array([-20.0, 0.0, -20.0])}
    saved = {}  # each map becomes a ball of radius 40 mm (peak 40 at its centre), put back afterwards
    for name in (first, second):
        voxels = numpy_support.vtk_to_numpy(logic.map_node(name).GetImageData().GetPointData().GetScalars())
        saved[name] = (voxels, voxels.copy())
        voxels[:] = ball_values(logic.map_node(name), centre[name], 40.0)
        logic.map_node(name).GetImageData().Modified()
    try:
        shown = logic.show_map(first, opacity=0.4, threshold=0.5)
        surface = surface_of(shown)
        display = surface.GetDisplayNode()
        assert surface.GetAttribute("MedAlign.Role") == SURFACE_ROLE and surface.GetAttribute(glue.FINDING) == first
        assert display.GetVisibility() and display.GetVisibility3D() and not display.GetVisibility2D()
        assert display.GetOpacity() == pytest.approx(0.4)
        # where the map crosses the threshold (half its peak): a sphere of radius 40 - level, up to
        # the linear interpolation of a cone on the map's coarse grid (16 mm voxels here)
        tolerance = 0.15 * max(shown.GetSpacing())
        level = shown.GetDisplayNode().GetLowerThreshold()
        points = numpy_support.vtk_to_numpy(surface.GetPolyData().GetPoints().GetData())
        assert np.abs(np.linalg.norm(points - centre[first], axis=1) - (40.0 - level)).max() < tolerance
        # a higher threshold rebuilds it smaller; showing it again adds no node
        assert logic.show_map(first, opacity=0.4, threshold=0.8) is shown and surface_of(shown) is surface
        level = shown.GetDisplayNode().GetLowerThreshold()
        points = numpy_support.vtk_to_numpy(surface.GetPolyData().GetPoints().GetData())
        assert np.abs(np.linalg.norm(points - centre[first], axis=1) - (40.0 - level)).max() < tolerance
        # another finding: its surface shows, the first hides; opacity 0 hides it too
        other = surface_of(logic.show_map(second, opacity=0.6))
        assert other is not surface and other.GetDisplayNode().GetVisibility() and not display.GetVisibility()
        logic.show_map(second, opacity=0.0)
        assert not other.GetDisplayNode().GetVisibility()
        surfaces = [n for n in (scene.GetNthNodeByClass(i, "vtkMRMLModelNode")
                                for i in range(scene.GetNumberOfNodesByClass("vtkMRMLModelNode")))
                    if n.GetAttribute("MedAlign.Role") == SURFACE_ROLE]
        assert sorted(s.GetName() for s in surfaces) == sorted(f"{name} map surface" for name in (first, second))
        sh = scene.GetSubjectHierarchyNode()
        assert sh.GetItemParent(sh.GetItemByDataNode(surface)) == sh.GetItemParent(sh.GetItemByDataNode(shown))
    finally:
        for name, (voxels, original) in saved.items():
            voxels[:] = original
            logic.map_node(name).GetImageData().Modified()
