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


def test_thresholds_are_printed_with_a_legend_and_stored(tiny_model, ct_file, tmp_path, capsys):
    """The flag column had no legend and the thresholds behind it were nowhere in the output."""
    out = tmp_path / "out"
    assert main(["screen", str(ct_file), "--out", str(out), "--model", tiny_model, "--no-maps",
                 "--findings", "Lung nodule;Emphysema"]) == 0
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("finding"))
    assert "thr" in header.split() and "flag: *" in table
    row = next(line for line in table.splitlines() if line.startswith("Lung nodule"))
    assert " 0.40 " in row  # the tiny checkpoint's threshold for Lung nodule
    data = {f["name"]: f for f in json.loads((out / "results.json").read_text(encoding="utf-8"))["findings"]}
    assert data["Lung nodule"]["threshold"] == 0.4 and data["Emphysema"]["threshold"] == 0.5
    rows = {r["finding"]: r for r in csv.DictReader((out / "results.csv").open(encoding="utf-8"))}
    assert float(rows["Lung nodule"]["threshold"]) == 0.4


def test_eval_help_renders_percent_signs(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    assert "95%" in text and "%%" not in text and "--bootstrap N" in text


def test_label_reports_takes_semicolons_like_every_command(tmp_path, capsys):
    src = tmp_path / "reports.csv"
    src.write_text("VolumeName,report_text\na.nii.gz,Cardiomegaly. No emphysema.\n", encoding="utf-8")
    for n, spec in enumerate(("Cardiomegaly;Emphysema", "Cardiomegaly,Emphysema")):
        out = tmp_path / f"labels{n}.csv"
        assert main(["label-reports", str(src), "--out", str(out), "--findings", spec]) == 0
        rows = list(csv.DictReader(out.open(encoding="utf-8")))
        assert rows == [{"VolumeName": "a.nii.gz", "Cardiomegaly": "1", "Emphysema": "0"}]


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`medalign models show X | head` ended in a BrokenPipeError traceback."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes a byte
    proc = subprocess.run([sys.executable, "-m", "medalign.cli", "models", "show", "medalign-demo"],
                          stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
                          env={**os.environ, "MEDALIGN_HOME": str(tmp_path / "home")})
    os.close(write)
    assert proc.returncode == 141 and proc.stderr == ""


def test_medalign_shared_may_name_the_data_folder(tmp_path):
    """The README called MEDALIGN_SHARED the data folder; read as its parent, ~106 tests skipped."""
    from conftest import REPO, shared_root

    (tmp_path / "shared" / "data" / "real_ct").mkdir(parents=True)
    assert shared_root(str(tmp_path / "shared" / "data")) == tmp_path / "shared"
    assert shared_root(str(tmp_path / "shared")) == tmp_path / "shared"
    assert shared_root(None) == REPO.parent / "shared"
