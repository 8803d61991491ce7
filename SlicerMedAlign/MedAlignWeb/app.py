"""The web screening viewer: a trame-slicer page bound to a ``ScreeningSession``.

This module holds no screening rule: page events call ``ScreeningSession`` (the Slicer
panel's controller and MRML glue), and its answers become page state. Slicer's own slice
and 3D views are rendered on the server (trame-slicer's remote-controlled areas); the
page shows them next to a panel with the CT, model, findings, progress, results table,
overlay controls, colour legend, hotspot and export.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from pathlib import Path

from trame.app import TrameApp
from trame_server.utils.asynchronous import create_task

from medalign.core.errors import InputError, MedAlignError
from MedAlignLib.colors import inferno_rgb
from MedAlignLib.run_controller import RunOutcome, RunState

from .session import ScreeningSession
from .ui import build_page
from .uploads import DEFAULT_MAX_UPLOAD_MB, UploadFolder

logger = logging.getLogger("MedAlignWeb")

PUMP_S = 0.1
PRESETS = [
    {"title": "CT-RATE (18 findings)", "value": "ct-rate"},
    {"title": "CT-RATE-LT (15 rarer findings)", "value": "ct-rate-lt"},
    {"title": "Both (33 findings)", "value": "all"},
    {"title": "Only the free-text findings", "value": ""},
]


def legend_gradient() -> str:
    """CSS gradient of the maps' colour map (the module's inferno), low to high."""
    rgb = inferno_rgb(11)
    stops = ", ".join(f"rgb({int(r * 255)},{int(g * 255)},{int(b * 255)})" for r, g, b in rgb)
    return f"linear-gradient(to right, {stops})"


def findings_request(preset: str, free_text: str) -> list[str]:
    """What the page asks for, as ``--findings`` items: the preset's group word (expanded
    by the engine's ``parse_findings``) plus each ';'-separated free-text finding."""
    items = ([preset] if preset else []) + [s.strip() for s in (free_text or "").split(";") if s.strip()]
    if not items:  # an empty --findings would silently mean the default 18
        raise InputError("Choose a findings preset or type at least one finding.")
    return items


class WebViewer(TrameApp):
    """One page, one scene, one ``ScreeningSession`` (one screening at a time)."""

    def __init__(self, server=None, volumes: list[str] | None = None, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
                 device: str = "auto", adapters: list[str] | None = None) -> None:
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        super().__init__(server, client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration())
        self.layout_manager.set_layout("Quad View")
        self.uploads = UploadFolder(int(max_upload_mb * 1024 * 1024))
        self.session = ScreeningSession(self.slicer_app.scene, on_progress=self._on_progress, on_done=self._on_done,
                                        on_message=self._error, device=device, adapters=adapters)
        self._pump_task = None
        self._clients: set[str] = set()
        self._run_owner: str | None = None  # the browser that pressed Screen
        self._init_state(volumes or [])
        self.ui = build_page(self)
        self.server.controller.on_server_exited.add(self.close)
        self.server.add_protocol_to_configure(self._watch_connections)
        self.state.change("upload")(self._on_upload)

    # ------------------------------------------------------------------ state
    def _init_state(self, volumes: list[str]) -> None:
        models = self.session.models()
        model = models[0]["value"] if models else None
        self.state.update({
            "trame__title": "MedAlign web viewer",
            "server_volumes": [{"title": Path(v).name, "value": str(v)} for v in volumes],
            "server_volume": None, "volume_name": "", "upload": None,
            "models": models, "model": model,
            "adapter_offered": bool(self.session.adapter_locations),
            "adapters": self.session.adapters(model), "adapter": self.session.default_adapter(model),
            "download_dialog": False, "download_model": None, "download_question": "",
            "presets": PRESETS, "preset": "ct-rate", "free_text": "",
            "busy": False, "progress": 0.0, "status": "Load a CT: a file on the server, an upload or the sample CT.",
            "error": "", "rows": [], "shown": "", "opacity": 0.5, "threshold": 0.5,
            "legend": None, "legend_gradient": legend_gradient(), "screen_seconds": None,
        })
        self.volumes = volumes

    def _error(self, text: str) -> None:
        self.state.error = text

    def _refresh_results(self) -> None:
        self.state.rows = self.session.rows()
        self.state.shown = self.session.shown_finding
        self.state.legend = self.session.legend()
        self._show_slices_in_3d(bool(self.state.shown))
        self._render()

    def _show_slices_in_3d(self, map_shown: bool) -> None:
        """While a map is shown, turn the CT's volume rendering off: it hides the slice
        planes (and so the map on them) in the 3D view. Back on when no map is shown."""
        node = self.session.volume_node
        if node is None:
            return
        for i in range(node.GetNumberOfDisplayNodes()):
            display = node.GetNthDisplayNode(i)
            if display is not None and display.IsA("vtkMRMLVolumeRenderingDisplayNode"):
                display.SetVisibility(not map_shown)

    def _render(self) -> None:
        """Ask every view for a new picture now (a change of the slice composite nodes or
        of a display node alone can wait for the next interaction to be streamed)."""
        for view in self.slicer_app.view_manager.get_views():
            view.schedule_render()

    def _guard(self, action, *args):
        """Run a page action: a ``MedAlignError`` becomes the page's error line, never a crash."""
        self.state.error = ""
        try:
            return action(*args)
        except MedAlignError as exc:
            self.state.error = str(exc)
        return None

    # ------------------------------------------------------------------ input
    def load_sample(self) -> None:
        self._loaded(self._guard(self.session.load_sample))

    def load_server_volume(self, path: str) -> None:
        if path:
            self._loaded(self._guard(self.session.load_path, path))

    def _on_upload(self, upload, **_):
        if not upload:
            return
        self.state.upload = None
        files = upload if isinstance(upload, list) else [upload]
        for item in files[:1]:
            path = self._guard(self.uploads.save, item.get("name"), item.get("content"), item.get("size"))
            if path is not None:
                try:
                    self._loaded(self._guard(self.session.load_path, path, None))
                finally:
                    shutil.rmtree(path.parent, ignore_errors=True)

    def _loaded(self, node) -> None:
        if node is None:
            return
        self.slicer_app.display_manager.show_volume(node, do_reset_views=True)
        for slice_node in self.slicer_app.scene.GetNodesByClass("vtkMRMLSliceNode"):
            slice_node.SetSliceVisible(True)  # the 3D view shows the three slices, overlay included
        self.state.volume_name = node.GetName()
        self.state.status = f"Loaded {node.GetName()}. Choose a model and findings, then press Screen."

    # ------------------------------------------------------------------ models
    def choose_model(self, model: str | None) -> None:
        """A model was picked: the adapter list follows it (a choice that no longer fits goes
        back to none); one that is not downloaded asks first (the confirm dialog)."""
        self.refresh_adapters(model)
        question = self._guard(self.session.download_question, model)
        if question:
            self.state.update({"download_question": question, "download_model": model, "download_dialog": True})

    def refresh_adapters(self, model: str | None) -> None:
        """The adapter select's items for ``model``; the current choice stays if it still fits."""
        items = self._guard(self.session.adapters, model) or [{"title": "none", "value": ""}]
        self.state.adapters = items
        if self.state.adapter not in {item["value"] for item in items}:
            self.state.adapter = ""

    def download(self, model: str | None) -> None:
        """The dialog's Download: the weights come in a child process, with the progress bar and Cancel."""
        self.state.download_dialog = False
        if model and self._guard(self.session.start_download, model) is None and self.session.running:
            self._running(f"Downloading model '{model}'...")

    # ------------------------------------------------------------------ run
    def screen(self, model: str | None, preset: str, free_text: str, adapter: str | None = None) -> None:
        """The page's choices come as arguments (what this browser shows), not from the
        shared state, which another browser or a late sync could have changed. A model
        that is not downloaded asks for its download instead of screening."""
        if self._guard(self.session.download_question, model):
            return self.choose_model(model)
        findings = self._guard(findings_request, preset, free_text)
        if findings and self._guard(self.session.start, model, findings, adapter) is None and self.session.running:
            self._running()
        return None

    def _running(self, status: str | None = None) -> None:
        """A child was started by this browser: the page turns busy and its output is pumped."""
        self._run_owner = self._active_client()
        self.state.busy = True
        self.state.progress = 0.0
        if status:
            self.state.status = status
        self._started = asyncio.get_event_loop().time()
        self._pump_task = create_task(self._pump())

    async def _pump(self) -> None:
        while self.session.running:
            with self.state:
                self.session.pump()
            await asyncio.sleep(PUMP_S)

    def cancel(self) -> None:
        self.session.cancel()

    def _on_progress(self, fraction: float, message: str) -> None:
        self.state.progress = round(100.0 * fraction, 1)
        self.state.status = message

    def _on_done(self, outcome: RunOutcome) -> None:
        self.state.busy = self.session.runs.state is not RunState.IDLE
        self.state.status = outcome.message
        if outcome.status == "failed":
            self.state.error = outcome.message
        if outcome.table is not None:
            self.state.screen_seconds = round(asyncio.get_event_loop().time() - self._started, 1)
            self._refresh_results()
        if outcome.kind == "download":
            self.state.models = self.session.models()  # the label now says downloaded (or still not)

    # ------------------------------------------------------------------ results
    def show(self, finding: str) -> None:
        self._guard(self.session.show, finding)
        self._refresh_results()

    def set_opacity(self, opacity: float) -> None:
        self.state.opacity = float(opacity)
        self._guard(self.session.set_display, self.state.opacity, self.state.threshold)
        self._render()

    def set_threshold(self, threshold: float) -> None:
        self.state.threshold = float(threshold)
        self._guard(self.session.set_display, self.state.opacity, self.state.threshold)
        self.state.legend = self.session.legend()
        self._render()

    def hotspot(self) -> None:
        name = self._guard(self.session.hotspot_to_segment)
        if name:
            self.state.status = f"Hotspot of {name} created."
            self._render()

    def export(self):
        """The report zip as a download attachment (None, with the error shown, on failure)."""
        content = self._guard(self.session.export_zip)
        return self.server.protocol.addAttachment(content) if content is not None else None

    # ------------------------------------------------------------------ life
    def _active_client(self) -> str | None:
        """The browser whose message is being handled: wslink records it on its web app
        before calling a handler (wslink/protocol.py, ``last_active_client_id``); None if
        this wslink does not say."""
        handler = getattr(getattr(self.server.protocol, "publish", None), "__self__", None)
        return getattr(getattr(handler, "web_app", None), "last_active_client_id", None)

    def _watch_connections(self, protocol) -> None:
        """Follow the browsers: when the one that pressed Screen leaves mid-run, its run is
        cancelled (the process tree ended, nothing left behind); another browser leaving
        cancels nothing. If the starter is unknown, the last browser leaving cancels."""
        from wslink.websocket import LinkProtocol

        viewer = self

        class _Connections(LinkProtocol):
            def onConnect(self, request, client_id):
                viewer._clients.add(client_id)

            def onClose(self, client_id):
                viewer._clients.discard(client_id)
                owner = viewer._run_owner
                if viewer.session.running and (client_id == owner or (owner is None and not viewer._clients)):
                    what = "download" if viewer.session.downloading else "screening"
                    logger.info("the browser that started the %s left: cancelling it", what)
                    # Flushed here: a change left pending would make the next browser's run
                    # set busy=True equal to the last value pushed, so it would never be sent.
                    with viewer.state:
                        viewer.session.cancel(f"The browser that started the {what} left; it was cancelled.")

        protocol.registerLinkProtocol(_Connections())

    def close(self, **_) -> None:
        with contextlib.suppress(Exception):
            self.session.close()
        self.uploads.close()


def serve(host: str = "127.0.0.1", port: int = 8080, volumes: list[str] | None = None,
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, device: str = "auto", open_browser: bool = False,
          adapters: list[str] | None = None) -> int:
    """Start the viewer (blocks until the server stops); ``medalign web`` calls this.
    ``adapters``: adapter files and folders of them the page may offer."""
    import atexit
    import signal

    viewer = WebViewer(volumes=volumes, max_upload_mb=max_upload_mb, device=device, adapters=adapters)
    atexit.register(viewer.close)
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):  # a plain kill of the server must not leave a screening child behind
        viewer.close()
        if callable(previous):
            previous(signum, frame)
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_term)
    print(f"MedAlign web viewer on http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    viewer.server.start(host=host, port=port, open_browser=open_browser, show_connection_info=False,
                        disable_logging=True, timeout=0)
    viewer.close()
    return 0
