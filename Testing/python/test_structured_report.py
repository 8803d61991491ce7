"""The engine's structured report (medalign.inference.report): definition -> appearance ->
observations (anatomical words from a segmentation, else relative position) -> verdict;
JSON, CSV, escaped HTML; ``medalign screen --report --segmentation``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import synthetic_ct

from medalign.cli import main
from medalign.core.errors import InputError
from medalign.core.volume import Volume
from medalign.core.volume_io import write_volume
from medalign.inference.report import Segmentation, read_label_names, report_dict, report_html
from medalign.inference.results import FindingResult, Hotspot, ScreeningResult


def _labelmap() -> Segmentation:
    """1 mm grid, 40^3, a 'liver' cube at voxels 10..19 (label 5), RAS = ijk."""
    arr = np.zeros((40, 40, 40), dtype=np.int16)
    arr[10:20, 10:20, 10:20] = 5
    return Segmentation(Volume(arr, np.eye(4)), {5: "liver", 7: "spleen"})


def test_structure_at_names_the_organ_under_or_near_the_hotspot():
    seg = _labelmap()
    assert seg.structure_at((15.0, 15.0, 15.0)) == ("liver", 0.0)
    name, dist = seg.structure_at((15.0, 15.0, 25.0))  # 6 mm above the cube's top face (z = 19)
    assert name == "liver" and dist == pytest.approx(6.0)
    assert seg.structure_at((35.0, 35.0, 35.0)) is None  # nothing named within 10 mm
    assert seg.structure_at((500.0, 0.0, 0.0)) is None  # outside the labelmap


def _result(name: str, ras: tuple[float, float, float]) -> ScreeningResult:
    map_volume = Volume(np.zeros((40, 40, 40), dtype=np.float32), np.eye(4))
    f = FindingResult(name=name, probability=0.8, uncertainty=0.05, flagged=True, score=1.4, map=map_volume,
                      hotspot=Hotspot(ras=ras, value=2.0, extent_mm3=100.0, threshold=1.0), threshold=0.5)
    return ScreeningResult(input={}, model="m", device="cpu", findings=[f], elapsed_s=0.1, disclaimer="Research only.")


def test_report_is_structured_and_uses_the_segmentation_when_given():
    result = _result("Pleural effusion", (15.0, 15.0, 25.0))
    entry = report_dict(result, _labelmap())["findings"][0]
    assert list(entry)[:4] == ["finding", "definition", "appearance", "observations"]
    assert "fluid" in entry["definition"].lower() and "density" in entry["appearance"]
    assert entry["observations"]["location"] == "6 mm from the liver" and entry["observations"]["structure"] == "liver"
    assert entry["verdict"] == "flagged" and entry["probability"] == 0.8 and entry["uncertainty"] == 0.05
    plain = report_dict(result)["findings"][0]["observations"]
    assert plain["location"].endswith("part of the scanned region") and plain["structure"] is None


def test_html_is_escaped_and_self_contained():
    page = report_html(report_dict(_result("<script>alert(1)</script> & mass", (1.0, 1.0, 1.0))))
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; mass" in page
    assert "src=" not in page and "href=" not in page and page.startswith("<!DOCTYPE html>")


def test_read_label_names(tmp_path):
    (tmp_path / "t.txt").write_text("# Slicer colour table\n0 background 0 0 0 0\n5 liver 1 2 3 255\n52 aorta\n")
    assert read_label_names(tmp_path / "t.txt") == {5: "liver", 52: "aorta"}
    (tmp_path / "bad.txt").write_text("nothing here\n")
    with pytest.raises(InputError, match="names no label"):
        read_label_names(tmp_path / "bad.txt")


def test_cli_screen_report_with_segmentation(tiny_model, tmp_path, capsys):
    ct = synthetic_ct(seed=1)
    write_volume(ct, tmp_path / "ct.nii.gz")
    body = Volume((ct.array > -500).astype(np.int16) * 3, ct.ijk_to_ras)  # every hotspot lies in the body
    write_volume(body, tmp_path / "seg.nii.gz")
    (tmp_path / "labels.txt").write_text("3 soft_tissue_body\n")
    args = ["screen", str(tmp_path / "ct.nii.gz"), "--model", tiny_model, "--findings", "Lung nodule;Emphysema",
            "--device", "cpu", "--report", "--segmentation", str(tmp_path / "seg.nii.gz"),
            "--segmentation-labels", str(tmp_path / "labels.txt")]
    assert main(args + ["--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["anatomy_source"] == "segmentation 'seg.nii.gz'" and report["anatomy_note"] is None
    # the tiny random model may map no hotspot; any it maps lies in the labelled body
    assert [f["finding"] for f in report["findings"]] and all(
        "soft tissue body" in f["observations"]["location"] for f in report["findings"] if f["observations"])
    assert (tmp_path / "out" / "report.csv").read_text().startswith("finding,verdict,probability")
    assert "<h1>Screening report</h1>" in (tmp_path / "out" / "report.html").read_text()
    capsys.readouterr()
    assert main(args[:-2] + ["--out", str(tmp_path / "o2")]) == 2
    assert "Give --segmentation-labels" in capsys.readouterr().err
