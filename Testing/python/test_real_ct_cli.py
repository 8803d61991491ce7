"""The issue's 'Show' list on the shared real CTs, through the CLI, plus the main job."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medalign.cli import main
from medalign.core.volume_io import read_volume

REAL = ["abdomen_ct_3mm.nii.gz", "abdomen_ct_dicom", "chest_ct_lung_mass.nii.gz"]


@pytest.mark.parametrize("name", REAL)
def test_screen_real_ct_maps_inside_input(real_ct, tiny_model, tmp_path, name):
    out = tmp_path / "out"
    assert main(["screen", str(real_ct / name), "--out", str(out), "--model", tiny_model,
                 "--findings", "Lung nodule;Pleural effusion;Lung mass"]) == 0
    volume = read_volume(real_ct / name)
    lo, hi = volume.ras_bounds()
    tol = np.asarray(volume.spacing) / 2 + 1e-3
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    for f in data["findings"]:
        m = read_volume(out / f["map"])
        mlo, mhi = m.ras_bounds()
        assert np.all(mlo >= lo - tol) and np.all(mhi <= hi + tol), f["name"]
        assert (f["hotspot"] is None) == (not np.nanmax(m.array) > 0)  # a map with no positive value points nowhere
        if f["hotspot"] is not None:
            assert np.all(np.asarray(f["hotspot"]["ras"]) >= lo - tol) and np.all(np.asarray(f["hotspot"]["ras"]) <= hi + tol)


def test_mr_is_refused_with_one_sentence_and_nothing_written(real_ct, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["screen", str(real_ct / "mr_not_ct.nii.gz"), "--out", str(out), "--model", tiny_model]) == 2
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "not look like a CT" in last or "not CT" in last
    assert not out.exists()


def test_main_job_runs_on_the_embedded_default_model(tmp_path, monkeypatch, capsys):
    """README's main job: `medalign screen --sample --out DIR` with no CT and no registry."""
    monkeypatch.setenv("MEDALIGN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEDALIGN_OFFLINE", "1")
    from medalign.inference import screener as screening

    screening._MODEL_CACHE.clear()
    out = tmp_path / "out"
    assert main(["screen", "--sample", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert data["model"] == "medalign-demo" and len(data["findings"]) == 18
    assert len(list((out / "maps").glob("*.nii.gz"))) == 18
    printed = capsys.readouterr().out
    assert "medalign screen /path/to/ct.nii.gz" in printed
