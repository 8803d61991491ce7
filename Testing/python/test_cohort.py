"""``medalign batch`` / ``screen_cohort``: every case screened once, under its own id, inside --out."""

from __future__ import annotations

import csv
import json

from helpers import synthetic_ct

from medalign.cli import main
from medalign.core.atomic import TMP_PREFIX
from medalign.core.volume_io import write_volume


def _summary(out):
    with (out / "summary.csv").open(encoding="utf-8", newline="") as fh:
        return {r["id"]: r for r in csv.DictReader(fh)}


def _batch(src, out, model, *extra):
    return main(["batch", str(src), "--out", str(out), "--model", model, "--no-maps", *extra])


def test_uid_named_cases_are_all_screened(tiny_model, tmp_path, capsys):
    """Ids were cut at the first dot: both UIDs became '1' and one was skipped 'done earlier'."""
    src = tmp_path / "cohort"
    write_volume(synthetic_ct(seed=1), src / "1.2.840.1.nii.gz")
    write_volume(synthetic_ct(seed=2), src / "1.2.840.2.nii.gz")
    out = tmp_path / "out"
    assert _batch(src, out, tiny_model, "--findings", "Lung nodule") == 0
    rows = _summary(out)
    assert {i: r["status"] for i, r in rows.items()} == {"1.2.840.1": "screened", "1.2.840.2": "screened"}
    for case_id in rows:
        assert json.loads((out / case_id / "results.json").read_text(encoding="utf-8"))["input"]["case_id"] == case_id
    assert "2 screened, 0 skipped (already done), 0 failed" in capsys.readouterr().out


def test_duplicate_ids_are_refused_before_any_work(tiny_model, tmp_path, capsys):
    ct = write_volume(synthetic_ct(), tmp_path / "ct.nii.gz")
    listing = tmp_path / "cohort.csv"
    listing.write_text(f"id,path\nA,{ct}\nB,{ct}\nA,{ct}\n", encoding="utf-8")
    out = tmp_path / "out"
    assert _batch(listing, out, tiny_model) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medalign: error:") and "'A'" in err[0]
    assert not out.exists()


def test_rerun_with_other_findings_is_not_done_earlier(tiny_model, tmp_path):
    src = tmp_path / "cohort"
    write_volume(synthetic_ct(seed=1), src / "a.nii.gz")
    out = tmp_path / "out"
    assert _batch(src, out, tiny_model, "--findings", "Lung nodule") == 0
    assert _batch(src, out, tiny_model, "--findings", "Lung nodule") == 0
    assert _summary(out)["a"]["status"] == "skipped"
    assert _batch(src, out, tiny_model, "--findings", "Emphysema") == 0
    assert _summary(out)["a"]["status"] == "screened"
    data = json.loads((out / "a" / "results.json").read_text(encoding="utf-8"))
    assert [f["name"] for f in data["findings"]] == ["Emphysema"]
    assert data["settings"] == {"model": tiny_model, "findings": ["Emphysema"], "maps": False}


def test_one_unexpected_error_does_not_end_the_batch(tiny_model, tmp_path, capsys):
    src = tmp_path / "cohort"
    write_volume(synthetic_ct(seed=1), src / "a.nii.gz")
    write_volume(synthetic_ct(seed=2), src / "b.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("a file where case a's folder should go", encoding="utf-8")
    assert _batch(src, out, tiny_model, "--findings", "Lung nodule") == 2
    rows = _summary(out)
    assert rows["a"]["status"] == "failed" and rows["a"]["error"]
    assert rows["b"]["status"] == "screened" and (out / "b" / "results.json").is_file()
    captured = capsys.readouterr()
    assert "1 screened, 0 skipped (already done), 1 failed" in captured.out
    assert "skipped (already done)" in captured.err  # the bar carries the running counts
    with (out / "summary.csv").open(encoding="utf-8") as fh:
        assert "warnings" in fh.readline().split(",")


def test_case_ids_cannot_write_outside_out(tiny_model, tmp_path):
    """An id of '../../x' or an absolute path used to become the output folder itself."""
    ct = write_volume(synthetic_ct(), tmp_path / "ct.nii.gz")
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    escape = tmp_path / "escaped"
    listing = work / "cohort.csv"
    listing.write_text(f"id,path\n../../escaped,{ct}\n{tmp_path / 'absolute'},{ct}\n", encoding="utf-8")
    out = work / "out"
    assert _batch(listing, out, tiny_model, "--findings", "Lung nodule") == 0
    assert not escape.exists() and not (tmp_path / "absolute").exists()
    rows = _summary(out)
    assert all(r["status"] == "screened" for r in rows.values())
    for r in rows.values():
        folder = (out / r["folder"]).resolve()
        assert folder.parent == out.resolve() and (folder / "results.json").is_file()


def test_folder_ids_keep_uid_dots_and_cut_only_volume_suffixes(tmp_path):
    """DICOM folders named by UIDs all became case '1' (the name was cut at the first dot)."""
    from medalign.inference.cohort import list_cases

    for name in ("1.2.826.0.1.3680043", "1.2.826.0.1.3680044"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "slice0001.dcm").write_bytes(b"")
    for name in ("a.b.nii.gz", "c.NRRD", "d.mhd", "notes.txt", ".hidden.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    ids = [c.case_id for c in list_cases(tmp_path)]
    assert ids == ["1.2.826.0.1.3680043", "1.2.826.0.1.3680044", "a.b", "c", "d"]


def _results(out):
    """Every case's results.json without its timing, and its map files' bytes."""
    found = {}
    for path in sorted(out.glob("*/results.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        data.pop("elapsed_s")
        maps = {p.name: p.read_bytes() for p in sorted((path.parent / "maps").glob("*"))}
        found[path.parent.name] = (data, maps)
    return found


def test_workers_give_the_same_results_and_record_a_corrupt_file(tiny_model, tmp_path):
    """Two loader processes read and prepare ahead; a corrupt file among good ones is one failed row."""
    src = tmp_path / "cohort"
    for seed in range(3):
        write_volume(synthetic_ct(seed=seed, blob_ras=(20.0, 30.0, -10.0)), src / f"c{seed}.nii.gz")
    (src / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    outs = {}
    for workers in ("0", "2"):
        outs[workers] = tmp_path / f"out{workers}"
        argv = ["batch", str(src), "--out", str(outs[workers]), "--model", tiny_model,
                "--findings", "Lung nodule;Emphysema", "--workers", workers]
        assert main(argv) == 2  # one case failed
        rows = _summary(outs[workers])
        assert list(rows) == ["broken", "c0", "c1", "c2"]
        assert rows["broken"]["status"] == "failed" and rows["broken"]["error"]
        assert all(rows[c]["status"] == "screened" for c in ("c0", "c1", "c2"))
    assert _summary(outs["0"]) == _summary(outs["2"])
    with_workers, without = _results(outs["2"]), _results(outs["0"])
    assert list(with_workers) == ["c0", "c1", "c2"] and with_workers == without


def test_negative_workers_are_one_sentence(tiny_model, tmp_path, capsys):
    src = tmp_path / "cohort"
    write_volume(synthetic_ct(), src / "a.nii.gz")
    assert _batch(src, tmp_path / "out", tiny_model, "--workers", "-1") == 2
    assert capsys.readouterr().err.strip().startswith("medalign: error: The number of workers")
    assert not (tmp_path / "out").exists()


def test_a_batch_killed_midway_and_rerun_screens_every_case_exactly_once(tiny_model, tmp_path):
    """SIGKILL of the whole batch (main process and loader workers) while it works, then a rerun."""
    import os
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "cohort"
    n = 8
    for seed in range(n):
        write_volume(synthetic_ct(seed=seed), src / f"c{seed}.nii.gz")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "medalign.cli", "batch", str(src), "--out", str(out), "--model", tiny_model,
            "--findings", "Lung nodule", "--workers", "1", "--no-maps"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("*/results.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.parent.name for p in out.glob("*/results.json")}
    assert 0 < len(done_before) < n, proc.stderr.read().decode(errors="replace")[-2000:]
    assert not (out / "summary.csv").exists()

    assert _batch(src, out, tiny_model, "--findings", "Lung nodule", "--workers", "1") == 0
    rows = _summary(out)
    assert sorted(rows) == sorted(f"c{s}" for s in range(n))
    assert {i for i, r in rows.items() if r["status"] == "skipped"} == done_before
    assert {i for i, r in rows.items() if r["status"] == "screened"} == {f"c{s}" for s in range(n)} - done_before
    assert all((out / i / "results.json").is_file() for i in rows)
    assert not [p for p in out.rglob("*") if p.name.startswith(TMP_PREFIX)]


def test_torchrun_two_ranks_merge_into_the_one_process_results(tiny_model, tmp_path):
    """Real torchrun (gloo, 2 CPU processes): each rank screens its share, rank 0 merges the summaries."""
    import subprocess
    import sys

    src = tmp_path / "cohort"
    for seed in range(5):  # an uneven split: 3 cases on rank 0, 2 on rank 1
        write_volume(synthetic_ct(seed=seed, shape_kji=(30, 48, 48)), src / f"c{seed}.nii.gz")
    one, two = tmp_path / "one", tmp_path / "two"
    assert _batch(src, one, tiny_model, "--findings", "Lung nodule;Emphysema") == 0
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "medalign.cli", "batch", str(src), "--out", str(two), "--model", tiny_model, "--no-maps",
            "--findings", "Lung nodule;Emphysema", "--device", "cpu"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "5 screened, 0 skipped (already done), 0 failed" in proc.stdout
    assert (two / "summary.csv").read_bytes() == (one / "summary.csv").read_bytes()
    assert not list(two.glob("summary.rank*"))
    assert _results(two) == _results(one)
