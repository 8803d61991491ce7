"""``medalign screen`` / ``batch`` end to end, in-process, on a registered tiny checkpoint."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from helpers import synthetic_ct

from medalign.cli import main
from medalign.core.volume_io import write_volume


def test_screen_writes_results_and_maps(tiny_model, ct_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["screen", str(ct_file), "--out", str(out), "--model", tiny_model, "--findings", "Lung nodule;Emphysema"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert data["model"] == "tiny" and {f["name"] for f in data["findings"]} == {"Lung nodule", "Emphysema"}
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 and all(0 <= float(r["probability"]) <= 1 for r in rows)
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["emphysema.nii.gz", "lung_nodule.nii.gz"]
    assert "Lung nodule" in capsys.readouterr().out


def test_progress_lines_are_machine_readable(tiny_model, ct_file, tmp_path, capsys):
    from medalign.core.progress import parse_progress_line

    rc = main(["screen", str(ct_file), "--out", str(tmp_path / "o"), "--model", tiny_model,
               "--findings", "Atelectasis", "--progress-lines", "--no-maps"])
    assert rc == 0
    parsed = [parse_progress_line(l) for l in capsys.readouterr().out.splitlines()]
    fractions = [p[0] for p in parsed if p]
    assert fractions and fractions[-1] == 1.0
    assert not (tmp_path / "o" / "maps").exists()


@pytest.mark.parametrize("make_bad, phrase", [
    (lambda d: d / "missing.nii.gz", "does not exist"),
    (lambda d: write_volume(synthetic_ct().__class__(np.full((20, 32, 32), 300, np.int16) + np.arange(32, dtype=np.int16) * 40, np.eye(4)),
                            d / "mr.nii.gz"), "CT"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny_model, tmp_path, capsys, make_bad, phrase):
    bad = make_bad(tmp_path)
    out = tmp_path / "never"
    rc = main(["screen", str(bad), "--out", str(out), "--model", tiny_model])
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert rc == 2 and "Traceback" not in err
    assert last.startswith("medalign: error:") and phrase.lower() in last.lower()
    assert not out.exists()


def test_unknown_model_is_one_line(tmp_path, ct_file, capsys, monkeypatch):
    monkeypatch.setenv("MEDALIGN_HOME", str(tmp_path / "home"))
    rc = main(["screen", str(ct_file), "--out", str(tmp_path / "o"), "--model", "no-such-model"])
    assert rc == 2 and "Unknown model" in capsys.readouterr().err


def test_batch_folder_resumes_and_reports_failures(tiny_model, tmp_path):
    src = tmp_path / "cohort"
    src.mkdir()
    write_volume(synthetic_ct(seed=1), src / "a.nii.gz")
    write_volume(synthetic_ct(seed=2), src / "b.nrrd")
    (src / "c.nii.gz").write_bytes(b"not a nifti file at all")
    out = tmp_path / "batch"
    rc = main(["batch", str(src), "--out", str(out), "--model", tiny_model, "--findings", "Lung nodule", "--no-maps"])
    assert rc == 2  # one case failed, the others were screened
    rows = {r["id"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert rows["a"]["status"] == "screened" and rows["b"]["status"] == "screened" and rows["c"]["status"] == "failed"
    assert (out / "a" / "results.json").is_file()
    main(["batch", str(src), "--out", str(out), "--model", tiny_model, "--findings", "Lung nodule", "--no-maps"])
    rows = {r["id"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert rows["a"]["status"] == "skipped"
