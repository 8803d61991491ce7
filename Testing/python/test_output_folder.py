"""The output folder: checked before the work, locked, holding results and maps that belong together."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from medalign.cli import main

REPO = Path(__file__).resolve().parents[2]


def _screen(ct, out, model, *extra):
    return main(["screen", str(ct), "--out", str(out), "--model", model, "--progress-lines", *extra])


def _one_error_line(capsys) -> tuple[str, str]:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0], captured.out


@pytest.mark.parametrize("make_out, phrase", [
    (lambda d: (d / "taken.txt").write_text("x") and d / "taken.txt", "is an existing file"),
    (lambda d: (d / "f").write_text("x") and d / "f" / "sub", "cannot create"),
    (lambda d: Path("/proc/medalign-test-out"), "cannot create"),
    (lambda d: Path("/proc"), "cannot write"),
])
def test_unusable_out_fails_before_screening(tiny_model, ct_file, tmp_path, capsys, make_out, phrase):
    out = make_out(tmp_path)
    assert _screen(ct_file, out, tiny_model) == 2
    line, stdout = _one_error_line(capsys)
    assert line.startswith("medalign: error:") and phrase in line.lower()
    assert "MEDALIGN-PROGRESS" not in stdout  # refused before any screening work


def test_unusable_out_fails_before_a_cohort(tiny_model, ct_file, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    assert main(["batch", str(ct_file.parent), "--out", str(tmp_path / "taken"), "--model", tiny_model]) == 2
    line, _ = _one_error_line(capsys)
    assert "is an existing file" in line


def test_a_second_run_on_the_same_out_is_refused(tiny_model, ct_file, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from medalign.core.output_folder import claim
            with claim({str(out)!r}):
                print("held", flush=True)
                time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _screen(ct_file, out, tiny_model) == 2
        line, _ = _one_error_line(capsys)
        assert "another medalign run is writing to" in line.lower()
    finally:
        holder.kill()
        holder.wait()
    assert _screen(ct_file, out, tiny_model) == 0  # the lock went with the process


def test_rerun_replaces_maps_and_cleans_what_a_killed_run_left(tiny_model, ct_file, tmp_path):
    out = tmp_path / "out"
    assert _screen(ct_file, out, tiny_model, "--findings", "Lung nodule;Emphysema") == 0
    assert len(list((out / "maps").iterdir())) == 2
    (out / ".tmp-0123456789ab-results.json").write_text("half")  # a killed run's leftovers
    (out / ".tmp-0123456789ab-maps").mkdir()
    assert _screen(ct_file, out, tiny_model, "--findings", "Emphysema") == 0
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["emphysema.nii.gz"]
    assert [f["map"] for f in data["findings"]] == ["maps/emphysema.nii.gz"]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert _screen(ct_file, out, tiny_model, "--findings", "Emphysema", "--no-maps") == 0
    assert not (out / "maps").exists()


def test_every_finding_gets_its_own_map_file(tiny_model, ct_file, tmp_path):
    """'Lung nodule' and 'lung-nodule' shared lung_nodule.nii.gz; 肺结节 wrote maps/.nii.gz."""
    out = tmp_path / "out"
    assert _screen(ct_file, out, tiny_model, "--findings", "Lung nodule;lung-nodule;肺结节;Emphysema") == 0
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    files = {f["name"]: f["map"] for f in data["findings"]}
    assert len(set(files.values())) == 4 and files["Emphysema"] == "maps/emphysema.nii.gz"
    assert all(Path(m).name != ".nii.gz" and (out / m).is_file() for m in files.values())
    assert sorted(p.name for p in (out / "maps").iterdir()) == sorted(Path(m).name for m in files.values())
