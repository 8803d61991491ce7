"""``medalign web`` end to end in a real headless Chromium (Debian's ``chromium`` driven by
Playwright, no browser download), plus the upload rules without a browser.

The server runs as a real child (``python -m medalign.cli web``) on a free port; the page
is driven as a person would: load the sample CT, screen, click a finding, move the
sliders, make a segment, export, cancel, upload a file that is not a CT, close the tab
mid-run. Pixels are read from screenshots of Slicer's axial view as the browser shows it.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from medalign.core.errors import InputError

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FINDINGS = "Cardiomegaly;Pleural effusion;Lung nodule"  # the sample CT's findings: a short run
START_TIMEOUT_S = 90
VIEW_3D = 2  # index of the 3D view among the page's four view images (quad layout)
NAMED_CT = "named_synthetic_ct.nii.gz"  # the CT given on the server's command line
SMALL_CT = "small_ct.nii.gz"  # the download test's CT (only to show that Screen waits)
DEMO_ADAPTER = "demo_site.safetensors"  # in the folder the server offers adapters from (never screened with)


# ---------------------------------------------------------------------- uploads (no browser)
def test_upload_over_the_limit_is_refused_before_anything_is_written():
    from MedAlignWeb.uploads import UploadFolder

    folder = UploadFolder(max_bytes=1000)
    try:
        with pytest.raises(InputError, match="accepts files up to"):
            folder.save("ct.nii.gz", b"x" * 1001)
        with pytest.raises(InputError, match="accepts files up to"):
            folder.save("ct.nii.gz", None, size=10**9)  # a declared size over the limit, no content read
        with pytest.raises(InputError, match="is empty"):
            folder.save("ct.nii.gz", b"")
        assert list(folder.path.iterdir()) == []
    finally:
        folder.close()
    assert not folder.path.exists()


def test_upload_is_written_privately_under_its_base_name_only():
    from MedAlignWeb.uploads import UploadFolder

    folder = UploadFolder(max_bytes=10**6)
    try:
        assert folder.path.stat().st_mode & 0o777 == 0o700
        path = folder.save("../../etc/.evil name.nii.gz", [b"ab", b"cd"])  # chunks, as trame sends big files
        assert path.read_bytes() == b"abcd" and path.name == "evil_name.nii.gz"
        assert path.resolve().is_relative_to(folder.path.resolve())
        assert path.stat().st_mode & 0o777 == 0o600
        second = folder.save("evil name.nii.gz", b"x")
        assert second != path and path.exists()  # a second upload of the same name overwrites nothing
    finally:
        folder.close()


def test_web_command_refuses_a_missing_volume_in_one_sentence(tmp_path):
    result = subprocess.run([sys.executable, "-m", "medalign.cli", "web", str(tmp_path / "absent.nii.gz")],
                            capture_output=True, text=True, env=_env(tmp_path), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == f"medalign: error: {tmp_path / 'absent.nii.gz'} does not exist."
    result = subprocess.run([sys.executable, "-m", "medalign.cli", "web", "--adapter", str(tmp_path),
                             "--adapter", str(tmp_path / "absent.safetensors")],
                            capture_output=True, text=True, env=_env(tmp_path), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == f"medalign: error: {tmp_path / 'absent.safetensors'} does not exist."


# ---------------------------------------------------------------------- adapters (no browser)
def test_the_adapter_list_offers_none_and_the_server_adapters_that_fit_the_model(tiny_model, tmp_path):
    """``medalign web --adapter DIR --adapter FILE``: the session lists "none" and the
    adapters that fit the chosen model, preselects the file named on the command line, passes
    the chosen one to the run, and refuses one the page was not offered or that does not fit."""
    pytest.importorskip("trame_slicer", reason="needs trame-slicer (pip install 'trame-slicer[standalone]')")
    pytest.importorskip("psutil")
    from helpers import assert_one_sentence, lung_nodule_adapter, new_app, synthetic_ct

    from medalign.core.errors import CheckpointError
    from medalign.models import registry
    from MedAlignLib.adapter_choices import describe_adapter
    from MedAlignWeb.session import ScreeningSession

    sha = registry.get(tiny_model).sha256
    folder = tmp_path / "adapters"
    own = lung_nodule_adapter(folder / "a_site.safetensors", tiny_model, sha)
    foreign = lung_nodule_adapter(folder / "b_ctclip.safetensors", "ct-clip", "ab" * 32)
    (folder / "notes.txt").write_text("not an adapter")
    single = lung_nodule_adapter(tmp_path / "single.safetensors", tiny_model, sha)
    session = ScreeningSession(new_app().scene, adapters=[str(folder), str(single)])
    try:
        none = {"title": "none", "value": ""}
        assert session.adapters(tiny_model) == [none, *({"title": describe_adapter(f).label, "value": str(f)}
                                                       for f in (own, single))]
        assert session.adapters("medalign-demo") == [none]
        assert session.default_adapter(tiny_model) == str(single) and session.default_adapter("medalign-demo") == ""

        session.load_volume(synthetic_ct(shape_kji=(24, 40, 40), spacing=(7.0, 7.0, 8.0)), "web CT")
        elsewhere = lung_nodule_adapter(tmp_path / "elsewhere" / "x.safetensors", tiny_model, sha)
        with pytest.raises(InputError) as refusal:  # a browser cannot name any other file on the server
            session.start(tiny_model, ["Lung nodule"], str(elsewhere))
        assert_one_sentence(refusal.value, "x.safetensors is not one of the adapters this viewer offers")
        with pytest.raises(CheckpointError) as refusal:
            session.start(tiny_model, ["Lung nodule"], str(foreign))
        assert_one_sentence(refusal.value, "trained for model 'ct-clip'", f"not for '{tiny_model}'")
        assert not session.running

        session.start(tiny_model, ["Lung nodule"], str(own))
        assert session.running and session.runs.job.command()[-2:] == ["--adapter", str(own)]
        assert session.cancel()
        session.start(tiny_model, ["Lung nodule"], "")  # "none"
        assert "--adapter" not in session.runs.job.command()
    finally:
        session.close()


# ---------------------------------------------------------------------- the browser
def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "SlicerMedAlign"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MEDALIGN_HOME"] = str(tmp_path / "home")
    env["MEDALIGN_OFFLINE"] = "1"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _needs_a_browser():
    pytest.importorskip("psutil")
    pytest.importorskip("trame_slicer", reason="needs trame-slicer (pip install 'trame-slicer[standalone]')")
    if shutil.which("chromium") is None:
        pytest.skip("needs Debian's chromium (apt-get install chromium); absent here")
    pytest.importorskip("playwright", reason="needs playwright (pip install playwright)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``medalign web`` on a free port, as a child process; yields (url, psutil.Process)."""
    _needs_a_browser()
    from helpers import lung_nodule_adapter, synthetic_ct

    from medalign.core.volume_io import write_volume
    from medalign.models import registry

    tmp = tmp_path_factory.mktemp("web")
    named_ct = write_volume(synthetic_ct(), tmp / NAMED_CT)  # offered as "CT on the server"
    lung_nodule_adapter(tmp / "adapters" / DEMO_ADAPTER, "medalign-demo", registry.get("medalign-demo").sha256)
    yield from _serve(tmp, _env(tmp), [str(named_ct), "--adapter", str(tmp / "adapters")])


def _serve(tmp: Path, env: dict[str, str], args: list[str]):
    """Start ``medalign web`` with ``env``, wait for its port, yield (url, psutil.Process), stop it."""
    import psutil

    port = _free_port()
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - open for the server's whole life
    proc = subprocess.Popen([sys.executable, "-m", "medalign.cli", "web", "--port", str(port), *args],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail(f"the web server did not start: {(tmp / 'server.log').read_text(errors='replace')[-2000:]}")
    yield url, psutil.Process(proc.pid)
    proc.terminate()
    proc.wait(30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    _needs_a_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(server, browser):
    """A fresh tab on the viewer (a new browser client), closed after the test."""
    context = browser.new_context(viewport={"width": 1500, "height": 900}, accept_downloads=True)
    tab = context.new_page()
    tab.goto(server[0])
    tab.wait_for_selector("[data-testid=sample]", timeout=60_000)
    yield tab
    context.close()


def tid(name: str) -> str:
    return f"[data-testid={name}]"


def load_sample(page) -> None:
    page.click(tid("sample"))
    page.wait_for_selector("text=Loaded: sample chest CT", timeout=60_000)


def ask_for(page, findings: str) -> None:
    """Choose "only the free-text findings" and type ``findings`` (each choice is synced
    to the server before the next step)."""
    page.click(tid("preset"))
    page.click(".v-overlay .v-list-item:has-text('Only the free-text findings')")
    page.wait_for_selector(f"{tid('preset')}:has-text('Only the free-text findings')")
    page.fill(f"{tid('free-text')} input", findings)
    page.press(f"{tid('free-text')} input", "Tab")
    page.wait_for_timeout(500)


def hold(tree: list) -> list:
    """Freeze a run's processes (SIGSTOP) so it cannot end before a page lagging on busy
    cores shows Cancel; the tree kill resumes what it terminates
    (``MedAlignLib.processes.end_process_tree``), so Cancel is tested all the same."""
    for process in tree:
        process.suspend()
    return tree


def screenings(server) -> list:
    """The server's ``medalign ... screen`` descendants (the run's process tree)."""
    import psutil

    out = []
    for child in server[1].children(recursive=True):
        try:
            if "screen" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def axial_pixels(page, until=None, timeout_s: float = 30.0) -> np.ndarray:
    """RGB of the axial view (bottom right of the quad layout) as the browser shows it,
    once ``until(pixels)`` holds (the server re-renders and streams the view after a
    change; its pictures are compressed, so comparisons allow a little noise)."""
    from PIL import Image

    view = page.locator("img.image-display-area").nth(3)
    deadline = time.monotonic() + timeout_s
    while True:
        shot = np.asarray(Image.open(io.BytesIO(view.screenshot())).convert("RGB")).astype(np.int16)
        if until is None or until(shot):
            return _steady(view, shot)
        if time.monotonic() > deadline:
            raise AssertionError(f"the axial view did not show the expected change within {timeout_s:.0f} s")
        time.sleep(0.25)


def view_pixels(page, index: int) -> np.ndarray:
    """RGB of one of the four views as the browser shows it, once steady."""
    from PIL import Image

    view = page.locator("img.image-display-area").nth(index)
    return _steady(view, np.asarray(Image.open(io.BytesIO(view.screenshot())).convert("RGB")).astype(np.int16))


def _steady(view, shot: np.ndarray, timeout_s: float = 6.0) -> np.ndarray:
    """The view once two pictures in a row agree: the first frame after a change may be
    the streamer's low-quality interactive one."""
    from PIL import Image

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.4)
        again = np.asarray(Image.open(io.BytesIO(view.screenshot())).convert("RGB")).astype(np.int16)
        if again.shape == shot.shape and int((np.abs(again - shot).max(axis=2) > 30).sum()) < 10:
            return again
        shot = again
    return shot


def changed(previous: np.ndarray, pixels: int = 100):
    """``until`` condition: at least ``pixels`` pixels differ clearly from ``previous``."""
    return lambda shot: shot.shape == previous.shape and int((np.abs(shot - previous).max(axis=2) > 30).sum()) >= pixels


def coloured(rgb: np.ndarray) -> np.ndarray:
    """Pixels with colour (the CT is grey: its channels are equal)."""
    return (rgb.max(axis=2) - rgb.min(axis=2)) > 40


def map_hues(rgb: np.ndarray) -> np.ndarray:
    """Pixels in the map's purple-to-blue hues (inferno's low end: blue above green),
    left of the colour legend; the CT's volume rendering is beige (red > green > blue)."""
    hues = rgb[..., 2] > rgb[..., 1] + 12  # faint: the map is blended over the grey CT
    hues[:, int(0.7 * rgb.shape[1]):] = False
    return hues


def press(page, slider: str, key: str, times: int = 1) -> None:
    thumb = page.locator(f"{tid(slider)} .v-slider-thumb")
    thumb.focus()
    for _ in range(times):
        thumb.press(key)


def test_page_is_served_on_localhost_only(server):
    import psutil

    listening = [c for c in psutil.net_connections(kind="tcp")
                 if c.pid == server[1].pid and c.status == psutil.CONN_LISTEN]
    assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}


def test_screen_the_sample_and_overlay_a_finding(page, server, tmp_path, capsys):
    load_sample(page)
    ask_for(page, FINDINGS)
    before = axial_pixels(page)
    before_3d = view_pixels(page, VIEW_3D)  # the CT's volume rendering, no map yet
    assert not coloured(before).any(), "the CT alone is grey"
    started = time.monotonic()
    page.click(tid("screen"))
    page.wait_for_selector(tid("result-row"), timeout=180_000)
    shown = axial_pixels(page, lambda shot: coloured(shot).sum() > 100)  # the top finding's map
    seconds = time.monotonic() - started
    new_colour = coloured(shown) & ~coloured(before)
    assert new_colour.sum() > 100, "the map's colours appear in the slice view where it was grey"
    bright = new_colour & (shown[..., 0] > 180) & (shown[..., 0] > shown[..., 2] + 60)
    assert bright.sum() > 10, "the map's bright end (inferno orange/yellow: where it is high) shows"
    three_d = view_pixels(page, VIEW_3D)
    assert map_hues(three_d).sum() > 50 > map_hues(before_3d).sum(), \
        "the map's colours appear in the 3D view (on the slice planes: the CT's volume rendering is off)"
    rows = page.locator(tid("result-row"))
    names = [rows.nth(i).locator("td").first.inner_text() for i in range(rows.count())]
    probabilities = [float(rows.nth(i).locator("td").nth(1).inner_text()) for i in range(rows.count())]
    assert sorted(names) == sorted(FINDINGS.split(";")) and probabilities == sorted(probabilities, reverse=True)
    with capsys.disabled():
        print(f"\n[web] Screen -> overlay on the sample CT (3 findings, demo model, CPU): {seconds:.1f} s")

    # Click another finding: its map replaces the first (legend title follows).
    other = names[1]
    rows.nth(1).click()
    page.wait_for_selector(f"{tid('legend')}:has-text('{other}')", timeout=20_000)
    other_map = axial_pixels(page, changed(shown))
    press(page, "opacity", "End")  # opacity 1
    full = axial_pixels(page, changed(other_map))
    press(page, "opacity", "Home")  # opacity 0
    bare = axial_pixels(page, changed(full))
    # The threshold slider reaches the view (a higher threshold hides the map's low part;
    # the in-view colour legend's labels change with it, so pixels are not compared here).
    press(page, "opacity", "End")
    axial_pixels(page, changed(bare))
    press(page, "threshold", "ArrowRight", 6)  # 0.5 -> 0.8 of the map's range
    axial_pixels(page, changed(full, 20))

    page.click(tid("hotspot"))
    page.wait_for_selector(f"{tid('status')}:has-text('Hotspot of {other}')", timeout=20_000)

    with page.expect_download(timeout=60_000) as download:
        page.click(tid("export"))
    archive = zipfile.ZipFile(download.value.path())
    files = set(archive.namelist())
    assert {"report.json", "report.csv", "results.json"} <= files
    assert sum(name.startswith("maps/") for name in files) == 3

    # Back to the top finding at the default threshold, for the README's picture.
    press(page, "threshold", "ArrowLeft", 6)
    rows.nth(0).click()
    page.wait_for_selector(f"{tid('legend')}:has-text('{names[0]}')", timeout=20_000)
    axial_pixels(page, lambda shot: (coloured(shot) & ~coloured(before)).sum() > 100)
    page.screenshot(path=os.environ.get("MEDALIGN_WEB_SCREENSHOT") or str(tmp_path / "web_viewer.png"))


def test_results_table_shows_every_column_inside_the_panel(page, server):
    """Issue 26 gap: in a 1500x900 window the held-out AUC column was cut off."""
    load_sample(page)
    ask_for(page, FINDINGS)
    page.click(tid("screen"))
    # The scene is shared: the rows of an earlier test are on the page already, so wait
    # for this run's child to come and go (a browser leaving mid-run would cancel it).
    wait_for(lambda: screenings(server), 30, "the screening child")
    wait_for(lambda: not screenings(server), 180, "the screening to end")
    page.wait_for_selector(f"{tid('screen')}:enabled", timeout=30_000)
    page.wait_for_selector(tid("result-row"), timeout=30_000)
    panel = page.locator("nav.v-navigation-drawer").bounding_box()
    table = page.locator(f"{tid('results')} table").bounding_box()
    auc = page.locator(tid("column-auc"))
    box = auc.bounding_box()
    assert auc.is_visible() and auc.get_attribute("title").startswith("Held-out AUC")
    assert box["x"] + box["width"] <= panel["x"] + panel["width"], "the AUC header lies inside the panel"
    assert table["x"] + table["width"] <= panel["x"] + panel["width"], "the table fits the panel"
    lines = auc.evaluate("th => { const r = document.createRange(); r.selectNodeContents(th);"
                         " return r.getClientRects().length; }")
    assert lines == 1, f"the AUC header reads on one line, not squeezed into {lines}"
    cell = page.locator(tid("result-row")).first.locator("td").nth(4).bounding_box()
    assert cell["x"] + cell["width"] <= panel["x"] + panel["width"], "the AUC values are inside the panel"


def test_a_ct_named_on_the_command_line_is_offered_and_loads(page):
    page.click(tid("server-volume"))
    page.click(f".v-overlay .v-list-item:has-text('{NAMED_CT}')")
    # The scene is the server's (one per app): the name shown changes from the sample's.
    page.wait_for_selector(f"{tid('volume-name')}:has-text('Loaded: named_synthetic_ct')", timeout=60_000)
    assert not page.locator(tid("error")).is_visible()


def test_the_adapter_select_offers_none_and_the_servers_adapter_for_the_model(page):
    page.click(tid("adapter"))
    items = page.locator(".v-overlay .v-list-item")
    items.first.wait_for(timeout=20_000)
    assert [items.nth(i).inner_text().strip() for i in range(items.count())] == [
        "none", f"{DEMO_ADAPTER} — medalign-demo · vip+kmat · 2 shots · 1 finding"]
    page.keyboard.press("Escape")


def test_cancel_ends_the_screening_process_tree(page, server):
    load_sample(page)
    ask_for(page, "all")  # 33 findings: the run outlasts a page that lags on 2 busy cores
    page.click(tid("screen"))
    tree = hold(wait_for(lambda: screenings(server), 30, "the screening child"))
    page.wait_for_selector(f"{tid('cancel')}:visible", timeout=60_000)
    assert page.locator(tid("screen")).is_disabled(), "one screening at a time"
    page.click(tid("cancel"))
    page.wait_for_selector(f"{tid('status')}:has-text('cancelled')", timeout=30_000)
    wait_for(lambda: not any(p.is_running() and p.status() != "zombie" for p in tree), 15, "the child to end")
    assert screenings(server) == []
    assert page.locator(tid("screen")).is_enabled()


def test_a_non_ct_upload_shows_the_engines_sentence_and_the_app_keeps_running(page, server, tmp_path):
    from helpers import synthetic_ct

    from medalign.core.volume_io import read_volume, write_volume
    from medalign.inference.input_checks import check_ct

    labels = synthetic_ct(shape_kji=(20, 32, 32))
    labels.array = (np.arange(labels.array.size).reshape(labels.array.shape) % 4).astype(np.int16)
    path = write_volume(labels, tmp_path / "segmentation.nii.gz")
    with pytest.raises(InputError) as refusal:
        check_ct(read_volume(path))
    page.set_input_files(f"{tid('upload')} input[type=file]", str(path))
    page.wait_for_selector(f"{tid('error')}:has-text('looks like a label map')", timeout=30_000)
    assert page.inner_text(tid("error")).strip() == str(refusal.value)
    assert server[1].is_running()
    page.click(tid("sample"))  # the page still works: a CT loads and the error line goes
    page.wait_for_selector(tid("error"), state="hidden", timeout=60_000)


def test_a_browser_leaving_mid_run_cancels_only_its_own_run(page, server, browser):
    load_sample(page)
    ask_for(page, "all")  # a long run, so it is still going when the browsers leave
    watcher = browser.new_context().new_page()  # a second browser on the same viewer
    watcher.goto(server[0])
    watcher.wait_for_selector(tid("sample"), timeout=60_000)
    page.click(tid("screen"))
    tree = hold(wait_for(lambda: screenings(server), 30, "the screening child"))
    page.wait_for_selector(f"{tid('cancel')}:visible", timeout=30_000)
    watcher.context.close()  # a browser that did not start the run leaves: nothing is cancelled
    time.sleep(2)
    page.wait_for_selector(f"{tid('cancel')}:visible", timeout=30_000)
    assert all(p.is_running() and p.status() != "zombie" for p in tree)
    page.context.close()  # the browser that pressed Screen leaves: its run's process tree ends
    wait_for(lambda: not any(p.is_running() and p.status() != "zombie" for p in tree), 30, "the child to end")
    assert screenings(server) == [] and server[1].is_running()
    # The next browser's run shows as running (the cancel on leaving was pushed, not left
    # pending: a pending busy=False made the next busy=True look unchanged and unsent).
    later = browser.new_context().new_page()
    later.goto(server[0])
    later.wait_for_selector(f"{tid('screen')}:enabled", timeout=60_000)
    later.click(tid("screen"))
    hold(wait_for(lambda: screenings(server), 30, "the next screening child"))
    later.wait_for_selector(f"{tid('cancel')}:visible", timeout=30_000)
    later.click(tid("cancel"))
    later.wait_for_selector(f"{tid('status')}:has-text('cancelled')", timeout=30_000)
    later.context.close()


# ---------------------------------------------------------------------- download on first use
@pytest.fixture(scope="module")
def hub_server(tmp_path_factory):
    """A viewer whose Hugging Face Hub is ``hub_server.LocalHub`` on 127.0.0.1 (COLIPRI's and
    CXR-BERT's repositories, random bytes: this is about the download, not screening);
    yields (url, psutil.Process, hub)."""
    _needs_a_browser()
    from helpers import synthetic_ct
    from hub_server import LocalHub
    from test_hub import CXR_BERT, CXR_BERT_COMMIT, ENCODER_FILES, WEIGHTS

    from medalign.core.volume_io import write_volume

    tmp = tmp_path_factory.mktemp("web-hub")
    small_ct = write_volume(synthetic_ct(shape_kji=(24, 40, 40), spacing=(7.0, 7.0, 8.0)), tmp / SMALL_CT)
    with LocalHub() as hub:
        hub.add("model/microsoft/colipri", {"model.safetensors": WEIGHTS})
        hub.add(f"model/{CXR_BERT}", dict(ENCODER_FILES), commit=CXR_BERT_COMMIT)
        env = {name: value for name, value in _env(tmp).items()
               if name not in ("MEDALIGN_OFFLINE", "HF_HUB_OFFLINE", "HF_TOKEN") and "proxy" not in name.lower()}
        env.update({"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(tmp / "hf"), "HF_HOME": str(tmp / "hf-home"),
                    "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
        for url, process in _serve(tmp, env, [str(small_ct)]):
            yield url, process, hub


def test_choosing_a_model_that_is_not_downloaded_asks_then_downloads_with_progress(hub_server, browser):
    url, server_process, hub = hub_server
    hub.state.bytes_per_second = 1 << 20  # 3 MB of weights: about 3 s, long enough to see the run
    page = browser.new_context(viewport={"width": 1500, "height": 900}).new_page()
    page.goto(url)
    page.wait_for_selector(tid("sample"), timeout=60_000)
    page.click(tid("server-volume"))  # a small CT loads faster than the sample: Screen could start
    page.click(f".v-overlay .v-list-item:has-text('{SMALL_CT}')")
    page.wait_for_selector(f"{tid('volume-name')}:has-text('Loaded: small_ct')", timeout=60_000)
    assert page.locator(tid("screen")).is_enabled()
    page.click(tid("model"))
    page.click(".v-overlay .v-list-item:has-text('COLIPRI — MIT · not downloaded')")
    question = page.wait_for_selector(tid("download-question"), timeout=20_000)
    assert question.inner_text().startswith("Model COLIPRI (MIT) is not downloaded yet. Download it now from "
                                            "the Hugging Face Hub?")
    page.click(tid("download-confirm"))
    page.wait_for_selector(f"{tid('cancel')}:visible", timeout=30_000)
    assert page.locator(tid("screen")).is_disabled(), "Screen waits while the model downloads"
    page.wait_for_selector(tid("download-dialog"), state="hidden", timeout=10_000)  # it fades out
    page.wait_for_selector(f"{tid('status')}:has-text(\"Model 'colipri' is downloaded and verified.\")",
                           timeout=60_000)
    bar = page.locator(f"{tid('progress')}")
    wait_for(lambda: bar.get_attribute("aria-valuenow") == "100", 10, "the progress bar to reach 100")
    page.wait_for_selector(f"{tid('model')}:has-text('COLIPRI — MIT · downloaded')", timeout=20_000)
    assert page.locator(tid("screen")).is_enabled() and not page.locator(tid("cancel")).is_visible()
    gets = [r for r in hub.requests_for("/cdn/") if r["method"] == "GET" and r["path"].endswith("model.safetensors")]
    assert len(gets) == 1 and server_process.is_running()
    page.context.close()
