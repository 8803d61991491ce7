"""The panel's run controller (``MedAlignLib.RunController``) on real slicer-core scenes
with real child processes: start, progress, the whole-tree cancel, a start that fails, a
child that crashes, the scene closed or the input removed mid-run, refused second clicks.

The fake programs below stand in for ``PythonSlicer``: a launcher that starts the real
Python as its child, as the CTK AppLauncher does, and passes no signal on.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="needs slicer-core (pip install 'trame-slicer[standalone]')")
pytest.importorskip("trame_slicer", reason="needs trame-slicer (pip install 'trame-slicer[standalone]')")
psutil = pytest.importorskip("psutil", reason="needs psutil (a dependency of the Slicer module)")

from helpers import assert_adapted_scores, assert_one_sentence, lung_nodule_adapter, synthetic_ct, tiny_checkpoint  # noqa: E402
from test_hub import WEIGHTS  # noqa: E402
from test_hub import local_hub as local_hub  # noqa: E402,F401 - the Hub stand-in fixture, shared with test_hub

from medalign.core.errors import CheckpointError, InputError  # noqa: E402
from MedAlignLib import (  # noqa: E402
    BackgroundDownload,
    BackgroundScreening,
    BusyError,
    PopenProcess,
    RunController,
    RunState,
    ScreeningLogic,
    model_choice,
    model_choices,
    needs_download,
    node_from_volume,
)

FINDINGS = ["Lung nodule", "Atelectasis"]
PROGRESS = "MEDALIGN-PROGRESS"


@pytest.fixture(scope="module")
def app():
    from trame_slicer.core import SlicerApp

    return SlicerApp()


@pytest.fixture()
def scene_node(app):
    """A fresh scene holding one small CT node."""
    app.scene.Clear(0)
    app.scene.GetSubjectHierarchyNode()  # Slicer always has one; reading a node's modality would add it
    node = node_from_volume(app.scene, synthetic_ct(shape_kji=(24, 40, 40), spacing=(7.0, 7.0, 8.0)), "run CT")
    return app.scene, node


def node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def program(path: Path, body: str) -> str:
    """An executable Python script (a stand-in for PythonSlicer) at ``path``."""
    path.write_text(f"#!{sys.executable}\n{body}", encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def launcher(tmp_path: Path, child_code: str | None = None) -> str:
    """Like PythonSlicer: starts the real Python as its child with the same arguments
    (or with ``child_code`` instead), waits, exits with its code, forwards no signal."""
    child = f"[sys.executable, '-c', {child_code!r}]" if child_code else "[sys.executable, *sys.argv[1:]]"
    return program(tmp_path / "PythonSlicer", f"import subprocess, sys\nsys.exit(subprocess.call({child}))\n")


def sleeper_code(pid_file: Path) -> str:
    """A child that reports progress, leaves its pid and sleeps (a long screening)."""
    return (f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
            f"print('{PROGRESS} 0.1000 loading the model', flush=True)\ntime.sleep(60)\n")


class Panel:
    """What the Qt panel would show: every progress update, state and outcome."""

    def __init__(self) -> None:
        self.progress, self.states, self.outcomes = [], [], []
        self.active = True

    def controller(self, logic, python: str | None = None) -> RunController:
        self.processes: list[PopenProcess] = []

        def new_process() -> PopenProcess:
            self.processes.append(PopenProcess())
            return self.processes[-1]

        return RunController(logic, new_process, on_progress=lambda f, m: self.progress.append((f, m)),
                             on_state=self.states.append, on_done=self.outcomes.append,
                             panel_active=lambda: self.active, python=python)


def pump_until(controller: RunController, condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        if controller.process is not None:
            controller.process.pump(0.05)


def running_with_progress(tmp_path, scene_node):
    """A controller whose child (launcher + sleeping grandchild) has reported progress."""
    scene, node = scene_node
    panel, pid_file = Panel(), tmp_path / "grandchild.pid"
    logic = ScreeningLogic(scene)
    before = node_ids(scene)
    controller = panel.controller(logic, python=launcher(tmp_path, sleeper_code(pid_file)))
    controller.start(node, FINDINGS, device="cpu")
    work_dir = controller.job.work_dir
    pump_until(controller, lambda: any(f > 0 for f, _ in panel.progress) and pid_file.exists())
    pids = [controller.process.pid(), int(pid_file.read_text())]
    assert all(psutil.pid_exists(pid) for pid in pids)
    return panel, controller, before, work_dir, pids


def assert_gone(pids: list[int], timeout_s: float = 3.0) -> None:
    """Every pid has ended (an orphan is reaped by init a moment after it dies)."""
    deadline = time.monotonic() + timeout_s
    while any(psutil.pid_exists(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if psutil.pid_exists(pid)]


# ---------------------------------------------------------------------- the hand-off
def test_hand_off_volume_is_raw_and_child_runs_in_utf8(scene_node, tmp_path):
    scene, node = scene_node
    job = BackgroundScreening(node, findings=FINDINGS, work_dir=tmp_path / "work")
    argv = job.command()
    assert argv[argv.index("screen") + 1] == str(job.input_path)
    header = job.input_path.read_bytes()[:400].split(b"\n\n")[0].decode()
    assert "encoding: raw" in header  # gzip here would cost seconds on the GUI thread for a real CT
    assert job.input_path.stat().st_size >= 24 * 40 * 40 * 2
    assert job.environment({})["PYTHONUTF8"] == "1"


# ---------------------------------------------------------------------- a whole run
@pytest.fixture()
def private_home(tmp_path, monkeypatch):
    """A private, offline MEDALIGN_HOME; sklearn and matplotlib unimportable in the child
    (the screening path must not need what the Slicer installer leaves out)."""
    monkeypatch.setenv("MEDALIGN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEDALIGN_OFFLINE", "1")
    blocked = tmp_path / "blocked"
    for name in ("sklearn", "matplotlib"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed in Slicer')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")]))
    return tmp_path / "home"


@pytest.fixture()
def registered_tiny(private_home, tmp_path):
    """A tiny checkpoint registered as model 'tiny' in the private home."""
    from medalign.models import registry
    from medalign.models.download import sha256_file

    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")
    registry.add("tiny", ckpt, sha256_file(ckpt))
    return "tiny"


def test_run_through_a_launcher_creates_nodes_and_leaves_views_alone_when_panel_hidden(
        scene_node, tmp_path, registered_tiny):
    scene, node = scene_node
    composites = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    logic, panel = ScreeningLogic(scene), Panel()
    panel.active = False  # the user went to another module while the run was going
    controller = panel.controller(logic, python=launcher(tmp_path))
    controller.start(node, FINDINGS, model=registered_tiny, device="cpu")
    work_dir = controller.job.work_dir
    assert controller.state is RunState.RUNNING
    assert controller.wait(240) and controller.state is RunState.IDLE

    (outcome,) = panel.outcomes
    assert outcome.status == "done", outcome.message
    assert outcome.message.startswith("Screened 2 findings.")
    fractions = [f for f, _ in panel.progress]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert panel.states == [RunState.RUNNING, RunState.IDLE] and controller.state is RunState.IDLE
    assert not work_dir.exists()
    # nodes are made, but nothing is shown: the panel was not on screen
    assert outcome.show_finding == "" and outcome.table.GetNumberOfRows() == 2
    assert all(not c.GetForegroundVolumeID() for c in composites)
    # back in the panel, clicking row k shows finding k's map in every slice view
    for row in (1, 0):
        finding = logic.finding_at_row(outcome.table, row)
        logic.show_map(finding)
        assert {c.GetForegroundVolumeID() for c in composites} == {logic.map_node(finding, outcome.table).GetID()}


# ---------------------------------------------------------------------- cancel
def test_cancel_ends_the_launcher_and_its_grandchild(scene_node, tmp_path):
    panel, controller, before, work_dir, pids = running_with_progress(tmp_path, scene_node)
    assert controller.cancel() is True
    assert controller.state is RunState.IDLE  # cancel waits for the end
    assert_gone(pids)
    (outcome,) = panel.outcomes
    assert outcome.status == "cancelled" and outcome.table is None
    assert node_ids(scene_node[0]) == before and not work_dir.exists()
    assert panel.states == [RunState.RUNNING, RunState.CANCELLING, RunState.IDLE]
    assert controller.cancel() is False  # nothing left to cancel


def test_scene_close_mid_run_cancels_and_creates_nothing(scene_node, tmp_path):
    panel, controller, before, work_dir, pids = running_with_progress(tmp_path, scene_node)
    scene_node[0].Clear(0)
    assert controller.state is RunState.IDLE
    assert_gone(pids)
    (outcome,) = panel.outcomes
    assert outcome.status == "cancelled" and "scene was closed" in outcome.message
    assert not work_dir.exists()


def test_removing_the_input_mid_run_cancels_and_creates_nothing(scene_node, tmp_path):
    scene, node = scene_node
    panel, controller, before, work_dir, pids = running_with_progress(tmp_path, scene_node)
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "unrelated")
    scene.RemoveNode(other)  # removing another node does not stop the run
    assert controller.state is RunState.RUNNING
    scene.RemoveNode(node)
    assert controller.state is RunState.IDLE
    assert_gone(pids)
    (outcome,) = panel.outcomes
    assert outcome.status == "cancelled" and "input volume was removed" in outcome.message
    assert not node_ids(scene) - before and not work_dir.exists()  # nothing new; the input is gone


# ---------------------------------------------------------------------- refused clicks
def test_second_start_and_install_are_refused_while_busy(scene_node, tmp_path):
    scene, node = scene_node
    panel, controller, before, work_dir, pids = running_with_progress(tmp_path, scene_node)
    with pytest.raises(BusyError, match="already running"):
        controller.start(node, FINDINGS)
    with pytest.raises(BusyError, match="already running"), controller.installing():
        pass
    assert len(panel.processes) == 1 and controller.state is RunState.RUNNING
    controller.cancel()
    assert_gone(pids)

    with controller.installing():
        assert controller.state is RunState.INSTALLING
        with pytest.raises(BusyError, match="being installed"):
            controller.start(node, FINDINGS)
        with pytest.raises(BusyError, match="being installed"), controller.installing():
            pass
    assert controller.state is RunState.IDLE and len(panel.processes) == 1


# ---------------------------------------------------------------------- failures
def test_missing_program_is_one_sentence_and_back_to_idle(scene_node, tmp_path, monkeypatch):
    import tempfile

    scene, node = scene_node
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where the run's work folder goes
    panel, logic = Panel(), ScreeningLogic(scene)
    before = node_ids(scene)
    missing = str(tmp_path / "no" / "PythonSlicer")
    controller = panel.controller(logic, python=missing)
    controller.start(node, FINDINGS)
    (outcome,) = panel.outcomes
    assert outcome.status == "failed"
    assert outcome.message.startswith(f"Could not start the screening process {missing}:")
    assert outcome.message.endswith(".") and "\n" not in outcome.message
    assert controller.state is RunState.IDLE and controller.job is None and controller.process is None
    assert node_ids(scene) == before
    assert list(temp.iterdir()) == []  # the work folder with the hand-off volume is gone


@pytest.mark.parametrize("ending, expected", [
    ("print('medalign: error: Model no-such-model is not registered.', file=sys.stderr)\nsys.exit(2)",
     "Model no-such-model is not registered."),
    ("raise RuntimeError('the model weights are damaged')", "exit code 1"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", "crashed or was killed (signal 11)"),
])
def test_crashing_child_is_one_sentence_with_its_stderr_tail(scene_node, tmp_path, caplog, ending, expected):
    scene, node = scene_node
    panel, logic = Panel(), ScreeningLogic(scene)
    before = node_ids(scene)
    crash = program(tmp_path / "crashing-python",
                    f"import sys\nprint('{PROGRESS} 0.2000 scoring', flush=True)\n"
                    "print('the model weights are damaged', file=sys.stderr, flush=True)\n" + ending + "\n")
    controller = panel.controller(logic, python=crash)
    caplog.set_level(logging.INFO, logger="MedAlign")
    controller.start(node, FINDINGS)
    work_dir = controller.job.work_dir
    pump_until(controller, lambda: panel.outcomes, timeout_s=20)
    (outcome,) = panel.outcomes
    assert outcome.status == "failed" and expected in outcome.message and "\n" not in outcome.message
    if "medalign: error" not in ending:  # no sentence of its own: the tail of its stderr says what happened
        assert "the model weights are damaged" in outcome.message
    assert "screening process: the model weights are damaged" in caplog.text  # stderr is logged as it comes
    assert node_ids(scene) == before and not work_dir.exists() and controller.state is RunState.IDLE


# ---------------------------------------------------------------------- few-shot adapter
def test_the_panels_adapter_reaches_the_child_and_a_foreign_one_is_refused_in_one_sentence(
        scene_node, tmp_path, registered_tiny):
    import json

    from medalign.models import registry
    from MedAlignLib.logic import PARAMETERS_JSON
    from MedAlignLib.nodes import volume_from_node

    scene, node = scene_node
    logic, panel = ScreeningLogic(scene), Panel()
    controller = panel.controller(logic, python=launcher(tmp_path))
    path = lung_nodule_adapter(tmp_path / "site.safetensors", registered_tiny, registry.get(registered_tiny).sha256, shots=1)
    controller.start(node, FINDINGS, model=registered_tiny, device="cpu", adapter=str(path))
    assert controller.job.command()[-2:] == ["--adapter", str(path)]
    assert controller.wait(240)
    (outcome,) = panel.outcomes
    assert outcome.status == "done", outcome.message
    shown = logic.result_from_table(outcome.table, load_maps=False)
    assert json.loads(outcome.table.GetAttribute(PARAMETERS_JSON))["adapter"] == str(path)  # the table says which
    assert_adapted_scores(shown, volume_from_node(node), registered_tiny, FINDINGS, path)

    # refused from its header: no child, no work folder
    foreign = lung_nodule_adapter(tmp_path / "ctclip.safetensors", "ct-clip", "ab" * 32, shots=1)
    before = node_ids(scene)
    with pytest.raises(CheckpointError) as refusal:
        controller.start(node, FINDINGS, model=registered_tiny, device="cpu", adapter=str(foreign))
    assert_one_sentence(refusal.value, "was trained for model 'ct-clip'", f"not for '{registered_tiny}'")
    assert len(panel.processes) == 1 and controller.state is RunState.IDLE and node_ids(scene) == before


def test_adapter_choices_describe_a_file_from_its_header_and_say_when_it_does_not_fit(registered_tiny, tmp_path):
    """The line under the panel's picker and the web viewer's list: from the header alone
    (no torch), the refusal in the screening's own sentence."""
    from dataclasses import replace

    from medalign.inference.adapter import read_adapter, save_adapter
    from medalign.models import registry
    from medalign.models.calibration import Calibration, FindingCalibration
    from MedAlignLib.adapter_choices import NO_ADAPTER, adapter_status, adapters_for_model, describe_adapter

    own = lung_nodule_adapter(tmp_path / "site.safetensors", registered_tiny, registry.get(registered_tiny).sha256, shots=1)
    foreign = lung_nodule_adapter(tmp_path / "ctclip.safetensors", "ct-clip", "ab" * 32, shots=1)
    choice = describe_adapter(own)
    assert choice.label == f"{own.name} — tiny · vip+kmat · 1 shot · 1 finding"
    assert choice.description == "Adapter for tiny (vip+kmat, 1 shot, no calibration of its own): Lung nodule."
    assert adapter_status(own, registered_tiny) == (choice.description, True)
    assert adapter_status(own, None) == (choice.description, True)  # no model chosen: the adapter names its own
    assert adapter_status("", registered_tiny) == (NO_ADAPTER, True)
    line, usable = adapter_status(foreign, registered_tiny)
    assert not usable and assert_one_sentence(CheckpointError(line), "trained for model 'ct-clip'", "not for 'tiny'")
    line, usable = adapter_status(own, "medalign-demo")
    assert not usable and "not for 'medalign-demo'" in line
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not an adapter")
    line, usable = adapter_status(garbage, registered_tiny)
    assert not usable and assert_one_sentence(CheckpointError(line), str(garbage), "is not a medalign adapter")
    line, usable = adapter_status(tmp_path / "gone.safetensors", registered_tiny)
    assert not usable and line.endswith("does not exist.")

    calibrated = replace(read_adapter(own), calibration=Calibration({"Lung nodule": FindingCalibration(bias=0.5)}, "x"))
    later = save_adapter(calibrated, tmp_path / "sub" / "calibrated.safetensors")
    assert describe_adapter(later).label.endswith("· 1 finding · calibrated")
    # tmp_path also holds the tiny model's own weights (a safetensors file that is no adapter)
    assert (tmp_path / "tiny.safetensors").is_file()
    listed = adapters_for_model([tmp_path, later, own], registered_tiny)
    assert [c.path for c in listed] == [str(own), str(later)]  # folders by name, each file once
    assert adapters_for_model([tmp_path], "medalign-demo") == []

    code = ("import sys\nfrom MedAlignLib.adapter_choices import adapter_status\n"
            f"print(adapter_status({str(own)!r}, 'tiny')[1], 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["True", "False"], done.stderr  # the picker's line costs no torch import


# ---------------------------------------------------------------------- model downloads
# The panel's "download on first use": ``RunController.start_download`` runs ``medalign
# models download NAME --progress-lines`` as a real child against a local Hub stand-in.
HUB_MODEL = "colipri"


def download_progress_on(panel: Panel, filename: str) -> list[float]:
    return [f for f, m in panel.progress if m.startswith(filename)]


def test_model_choices_label_every_model_with_licence_size_and_status(local_hub):
    choices = {c.name: c for c in model_choices()}
    assert list(choices)[0] == "medalign-demo"
    assert choices["medalign-demo"].label == "MedAlign demo — Apache-2.0 · 3 MB · ready"
    assert choices["brgsa"].label.endswith("· weights not registered") and not choices["brgsa"].needs_download
    colipri = choices[HUB_MODEL]
    assert colipri.label == "COLIPRI — MIT · not downloaded" and colipri.licence == "MIT"
    assert colipri.needs_download and needs_download(HUB_MODEL) and colipri.source == "hub"
    assert colipri.trained_on.startswith("chest CT")
    assert not needs_download("medalign-demo") and not needs_download("no-such-model") and not needs_download(None)


def test_the_download_child_never_imports_torch(local_hub):
    """The panel's download child starts in a second or two, not the 8-11 s that importing
    torch takes on a busy machine (``medalign.models`` imported it through ``models.base``)."""
    code = ("import sys\nfrom medalign.cli import main\n"
            f"code = main(['models', 'download', '{HUB_MODEL}', '--progress-lines'])\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch', code)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=BackgroundDownload(HUB_MODEL).environment())
    assert done.stdout.splitlines()[-1] == "no torch 0", done.stdout + done.stderr


def test_download_runs_in_a_child_reports_progress_and_flips_the_status(local_hub, tmp_path):
    panel = Panel()
    controller = panel.controller(None, python=launcher(tmp_path))  # through a PythonSlicer-like launcher
    controller.start_download(HUB_MODEL)
    assert controller.downloading and controller.state is RunState.RUNNING
    assert controller.wait(120) and controller.state is RunState.IDLE
    (outcome,) = panel.outcomes
    assert (outcome.status, outcome.kind, outcome.model) == ("done", "download", HUB_MODEL)
    assert outcome.message == "Model 'colipri' is downloaded and verified."
    weights = download_progress_on(panel, "model.safetensors")
    assert weights and weights[-1] == 1.0 and weights == sorted(weights)
    assert panel.states == [RunState.RUNNING, RunState.IDLE]
    choice = model_choice(HUB_MODEL)
    assert choice.status == "downloaded" and choice.label == "COLIPRI — MIT · downloaded" and not choice.needs_download


def test_cancel_mid_download_ends_the_tree_and_the_next_download_resumes(local_hub, tmp_path):
    local_hub.state.bytes_per_second = 1 << 20  # the 3 MB weights take about 3 s
    panel = Panel()
    controller = panel.controller(None, python=launcher(tmp_path))
    controller.start_download(HUB_MODEL)
    pump_until(controller, lambda: any(f >= 0.2 for f in download_progress_on(panel, "model.safetensors")))
    launcher_pid = controller.process.pid()
    pids = [launcher_pid] + [child.pid for child in psutil.Process(launcher_pid).children(recursive=True)]
    assert len(pids) == 2  # the launcher and the real Python below it
    assert controller.cancel() is True and controller.state is RunState.IDLE
    assert_gone(pids)
    (cancelled,) = panel.outcomes
    assert (cancelled.status, cancelled.kind) == ("cancelled", "download")
    assert cancelled.message == ("The download of model 'colipri' was cancelled; what was fetched is kept "
                                 "and the next download continues from there.")
    (part,) = Path(os.environ["HF_HUB_CACHE"]).rglob("*.part")
    kept = part.stat().st_size
    assert 0 < kept < len(WEIGHTS) and needs_download(HUB_MODEL)

    local_hub.state.bytes_per_second = None
    controller.start_download(HUB_MODEL)
    assert controller.wait(120)
    assert panel.outcomes[-1].status == "done", panel.outcomes[-1].message
    gets = [r for r in local_hub.requests_for("/cdn/") if r["method"] == "GET" and r["path"].endswith("model.safetensors")]
    assert gets[-1]["range"] is not None and int(gets[-1]["range"].split("=")[1].rstrip("-")) >= kept
    assert not needs_download(HUB_MODEL)


@pytest.mark.parametrize("break_it, expected", [
    ("offline", "model.safetensors of microsoft/colipri is not downloaded and downloads are off"),
    ("wrong bytes", "was expected; it was deleted"),
])
def test_a_failed_download_is_the_childs_one_sentence(local_hub, monkeypatch, break_it, expected):
    if break_it == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        local_hub.state.repos["model/microsoft/colipri"].wrong_bytes.add("model.safetensors")
    panel = Panel()
    controller = panel.controller(None)
    controller.start_download(HUB_MODEL)
    assert controller.wait(120)
    (outcome,) = panel.outcomes
    assert outcome.status == "failed" and expected in outcome.message and "\n" not in outcome.message
    assert not outcome.message.startswith("medalign: error") and outcome.kind == "download"
    assert needs_download(HUB_MODEL) and not list(Path(os.environ["HF_HUB_CACHE"]).rglob("*.part"))


def test_unknown_model_and_screening_a_model_not_downloaded_are_refused_without_a_child(local_hub, scene_node):
    panel = Panel()
    controller = panel.controller(ScreeningLogic(scene_node[0]))
    with pytest.raises(CheckpointError, match="Unknown model 'no-such-model'"):
        controller.start_download("no-such-model")
    with pytest.raises(InputError, match="Model 'colipri' is not downloaded yet; download it first"):
        controller.start(scene_node[1], FINDINGS, model=HUB_MODEL)
    assert panel.processes == [] and controller.state is RunState.IDLE


def test_one_job_at_a_time_a_download_and_a_screening_refuse_each_other(local_hub, scene_node, tmp_path):
    scene, node = scene_node
    local_hub.state.bytes_per_second = 256 << 10  # a download that lasts
    panel = Panel()
    controller = panel.controller(ScreeningLogic(scene))
    controller.start_download(HUB_MODEL)
    downloading = "Model 'colipri' is being downloaded; wait for the download to finish or press Cancel first."
    with pytest.raises(BusyError) as refused:
        controller.start(node, FINDINGS)
    assert str(refused.value) == downloading
    with pytest.raises(BusyError, match="is being downloaded"):
        controller.start_download(HUB_MODEL)
    with pytest.raises(BusyError, match="is being downloaded"), controller.installing():
        pass
    scene.Clear(0)  # closing the scene does not stop a download: it belongs to no scene
    assert controller.downloading and len(panel.processes) == 1
    controller.cancel()

    controller.python = launcher(tmp_path, sleeper_code(tmp_path / "grandchild.pid"))
    node = node_from_volume(scene, synthetic_ct(shape_kji=(24, 40, 40), spacing=(7.0, 7.0, 8.0)), "run CT")
    controller.start(node, FINDINGS)
    with pytest.raises(BusyError, match="A screening is already running; press Cancel to stop it first."):
        controller.start_download(HUB_MODEL)
    assert not controller.downloading and len(panel.processes) == 2
    controller.cancel()
    assert [o.kind for o in panel.outcomes] == ["download", "screening"]
