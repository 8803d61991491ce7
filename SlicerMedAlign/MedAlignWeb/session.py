"""One web viewer's screening session, without any web framework: the scene's volume, the
run, the results rows, the overlay and the export.

Everything here goes through the objects the Slicer panel uses (``ScreeningLogic``,
``RunController`` with a ``PopenProcess`` child, ``DisplayController`` following a
parameter node, ``export_report``), so the browser and the Qt panel cannot disagree on
a rule; ``MedAlignWeb.app`` only binds page events to these methods. It is a plain
class so the browser tests and a script drive the same code.
"""

from __future__ import annotations

import io
import math
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from medalign.core.errors import InputError
from MedAlignLib import DisplayController, PopenProcess, RunController, RunOutcome, RunState, ScreeningLogic
from MedAlignLib.adapter_choices import adapter_files, adapters_for_model, check_adapter
from MedAlignLib.logic import FINDING
from MedAlignLib.model_choices import download_question, model_choice, model_choices
from MedAlignLib.nodes import node_from_volume
from MedAlignLib.results_view import OPACITY, RESULT_TABLE, SHOWN_FINDING, THRESHOLD

ReportFn = Callable[[str], None]


class ScreeningSession:
    """The screening state of one web viewer (one scene, one run at a time).

    ``on_progress(fraction, message)``, ``on_done(outcome)`` and ``on_message(text)``
    report to the page; ``pump()`` delivers the child's output (the page calls it from
    its event loop, as Qt's event loop delivers ``QProcess`` output in Slicer).
    """

    def __init__(self, scene, *, on_progress: Callable[[float, str], None] | None = None,
                 on_done: Callable[[RunOutcome], None] | None = None, on_message: ReportFn | None = None,
                 device: str = "auto", adapters: list[str] | None = None) -> None:
        self.scene = scene
        self.device = device
        # medalign web --adapter FILE|DIR (repeatable): where the adapters the page may offer lie
        self.adapter_locations = [str(a) for a in adapters or []]
        self.on_message = on_message or (lambda text: None)
        self.logic = ScreeningLogic(scene)
        self.parameter_node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "MedAlign web viewer")
        self.display = DisplayController(self.logic, self.parameter_node, report=self.on_message)
        self.runs = RunController(self.logic, PopenProcess, on_progress=on_progress,
                                  on_done=lambda outcome: self._run_done(outcome, on_done))
        self.volume_node = None
        self.table = None

    # ------------------------------------------------------------------ input
    def load_volume(self, volume, name: str):
        """Check ``volume`` is a CT (the engine's ``check_ct``: its sentence on refusal) and
        add it to the scene as the volume to screen; the previous results stay in the scene."""
        from medalign.inference.input_checks import check_ct

        self.runs._refuse_if_busy()
        check_ct(volume)
        self.volume_node = node_from_volume(self.scene, volume, name)
        return self.volume_node

    def load_path(self, path: str | Path, name: str | None = None):
        """Read a CT file or DICOM folder on the server (the engine's reader and checks)."""
        from medalign.core.volume_io import read_volume, strip_volume_suffix

        path = Path(path)
        return self.load_volume(read_volume(path), name or strip_volume_suffix(path.name))

    def load_sample(self):
        """The bundled sample CT (the phantom ``medalign screen --sample`` screens)."""
        from medalign.synth.phantoms import sample_chest_ct

        return self.load_volume(sample_chest_ct().volume, "sample chest CT (synthetic)")

    # ------------------------------------------------------------------ models
    @staticmethod
    def models() -> list[dict]:
        """The model select's items: the panel's labels ("COLIPRI — MIT · not downloaded"),
        read afresh each time (a download changes them)."""
        return [{"title": choice.label, "value": choice.name} for choice in model_choices()]

    @staticmethod
    def download_question(model: str | None) -> str:
        """The question to ask before ``model`` can screen, or "" when its weights are here."""
        if not model:
            return ""
        choice = model_choice(model)
        return download_question(choice) if choice.needs_download else ""

    # ------------------------------------------------------------------ adapters
    def adapters(self, model: str | None) -> list[dict]:
        """The adapter select's items: "none", then the server's adapters that fit ``model``
        (``MedAlignLib.adapter_choices``: the panel's labels), read afresh each time (a
        ``medalign adapt`` or ``calibrate --adapter`` may have written one since)."""
        fitting = adapters_for_model(self.adapter_locations, model)
        return [{"title": "none", "value": ""}, *({"title": c.label, "value": c.path} for c in fitting)]

    def default_adapter(self, model: str | None) -> str:
        """The adapter chosen before the page chooses: the first one named as a file on the
        command line that fits ``model`` (``medalign web --adapter FILE`` applies it, as it
        always did), else none."""
        offered = {item["value"] for item in self.adapters(model)}
        return next((str(f) for f in self.adapter_locations if Path(f).is_file() and str(f) in offered), "")

    def _offered_adapter(self, adapter: str | None, model: str | None) -> str | None:
        """``adapter`` (a path the page sent) when it is one of the server's adapter files and
        fits ``model``; a browser cannot name any other file on the server."""
        if not adapter:
            return None
        if Path(adapter).resolve() not in {f.resolve() for f in adapter_files(self.adapter_locations)}:
            raise InputError(f"{Path(adapter).name} is not one of the adapters this viewer offers; choose one from the list.")
        check_adapter(adapter, model)
        return adapter

    def start_download(self, model: str) -> None:
        """Download (or resume) ``model``'s weights in a child process, with the same progress,
        Cancel and one-job-at-a-time rule as a screening."""
        self.runs.start_download(model)

    # ------------------------------------------------------------------ run
    @property
    def running(self) -> bool:
        return self.runs.running

    @property
    def downloading(self) -> bool:
        return self.runs.downloading

    def start(self, model: str | None, findings: list[str], adapter: str | None = None) -> None:
        """Start screening the loaded CT in a child process (one run at a time: a second
        start while one runs is refused with ``BusyError``), with ``adapter`` (one of the
        server's adapter files; "" or None: none)."""
        if self.volume_node is None or not self.scene.IsNodePresent(self.volume_node):
            raise InputError("Load a CT first: a file on the server, an upload or the sample CT.")
        self.runs.start(self.volume_node, findings, model or None, self.device,
                        adapter=self._offered_adapter(adapter, model))

    def pump(self) -> None:
        """Deliver the child's progress and end (no-op when nothing runs)."""
        process = self.runs.process
        if self.runs.state is RunState.RUNNING and process is not None:
            process.pump(0.0)

    def cancel(self, reason: str | None = None) -> bool:
        """End the run's whole process tree; False when nothing ran."""
        return self.runs.cancel(reason) if reason else self.runs.cancel()

    def close(self) -> None:
        """End what this session started (the server is going away): no child outlives it."""
        self.runs.cancel(None if self.downloading else "The web viewer closed; screening was cancelled.")
        self.display.close()

    def _run_done(self, outcome: RunOutcome, forward) -> None:
        if outcome.table is not None:
            self.table = outcome.table
            self.parameter_node.SetNodeReferenceID(RESULT_TABLE, outcome.table.GetID())
            if outcome.show_finding:
                self.display.show(outcome.show_finding)
        if forward is not None:
            forward(outcome)

    # ------------------------------------------------------------------ results
    def rows(self) -> list[dict]:
        """The results table's rows, in its order (ranked by probability by ``ScreeningLogic``)."""
        table = self.table
        if table is None:
            return []
        columns = {table.GetColumnName(c): c for c in range(table.GetNumberOfColumns())}

        def number(row: int, name: str) -> float | None:
            value = float(table.GetTable().GetValue(row, columns[name]).ToDouble())
            return None if math.isnan(value) else value

        return [{"finding": table.GetCellText(row, columns["finding"]),
                 "probability": number(row, "probability"), "uncertainty": number(row, "uncertainty"),
                 "flag": table.GetCellText(row, columns["flag"]), "auc": number(row, "held-out AUC")}
                for row in range(table.GetNumberOfRows())]

    def show(self, finding: str) -> None:
        """Overlay ``finding``'s map (what a click on a results row does in Slicer)."""
        self.display.show(finding)

    def set_display(self, opacity: float, threshold: float) -> None:
        """Opacity and threshold (fraction of the map's peak) of the overlay, through the
        parameter node the ``DisplayController`` follows."""
        self.parameter_node.SetParameter(OPACITY, str(float(opacity)))
        self.parameter_node.SetParameter(THRESHOLD, str(float(threshold)))

    @property
    def shown_finding(self) -> str:
        return self.parameter_node.GetParameter(SHOWN_FINDING) or ""

    def legend(self) -> dict | None:
        """Colour legend of the shown map: finding, value range and the threshold value."""
        from MedAlignLib.logic import threshold_value
        from MedAlignLib.results_view import display_state

        finding = self.shown_finding
        if not finding or self.table is None:
            return None
        try:
            node = self.logic.map_node(finding, self.table)
        except InputError:
            return None
        lo, hi = node.GetImageData().GetScalarRange()
        state = display_state(self.parameter_node)
        return {"finding": node.GetAttribute(FINDING) or finding, "low": float(lo), "high": float(hi),
                "threshold": float(threshold_value(lo, hi, state.threshold))}

    def hotspot_to_segment(self, finding: str | None = None) -> str:
        """Turn the finding's hotspot into a segment; returns its name."""
        finding = finding or self.shown_finding
        if not finding:
            raise InputError("Click a finding in the results table first.")
        node, _segment_id = self.logic.hotspot_to_segment(finding, table=self._results())
        return f"{finding} (segment in '{node.GetName()}')"

    def export_zip(self) -> bytes:
        """The structured report (report.json/csv), results and maps as one zip archive."""
        table = self._results()
        work = Path(tempfile.mkdtemp(prefix="medalign-export-"))
        try:
            out = self.logic.export(table, work / "report")
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                for path in sorted(p for p in out.rglob("*") if p.is_file()):
                    archive.write(path, path.relative_to(out).as_posix())
            return buffer.getvalue()
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _results(self):
        if self.table is None or not self.scene.IsNodePresent(self.table):
            raise InputError("There are no results yet; screen a CT first.")
        return self.table
