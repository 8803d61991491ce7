"""MedAlign: zero-shot CT abnormality screening with local alignment maps, in 3D Slicer.

The widget only wires Qt to ``MedAlignLib`` (MRML glue) and the ``medalign`` engine;
nothing here computes. Heavy Python packages (torch, MONAI, transformers ...) are
installed on first use, after one confirmation, never at import.
"""

import importlib
import json
import logging
import os
import tempfile
import time
from typing import Annotated, Union

import qt
import slicer
import vtk
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.parameterNodeWrapper import Choice, Default, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

import MedAlignLib
from medalign.core.errors import MedAlignError
from MedAlignLib.i18n import tr as _
from MedAlignLib.i18n import translate

DEFAULT_MODEL = "medalign-demo"
DEVICES = ["auto", "cpu", "cuda"]


#
# MedAlign
#


class MedAlign(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedAlign"
        # A core category, translated as Slicer's own modules do (DataProbe.py:25 at v5.8.1);
        # the Extensions Index accepts it (check_description_files.py ACCEPTED_EXTENSION_CATEGORIES).
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerMedAlign contributors"]
        # _() marks the texts for translation (Slicer's module template does the same).
        self.parent.helpText = _("""
Zero-shot screening of a chest CT for abnormalities with a 3D CT vision-language model.
Pick a CT volume, a model and the findings to screen (the 18 CT-RATE abnormalities, the
15 rarer CT-RATE-LT ones, or any finding typed as free text) and press <b>Screen</b>.
The results table ranks findings by probability with an uncertainty, a flag and the
model's held-out AUC for the finding (below 0.7 it reads "near chance" and is never
flagged); click a row to overlay that finding's local alignment map (where the image
matches the finding's description), turn its hotspot into a segment, or export a
structured report. An optional few-shot <i>adapter</i> (from <code>medalign adapt</code>) for the
chosen model can be picked under the model. With an <b>Anatomy</b> segmentation of the scan (e.g. TotalSegmentator's,
or found automatically when exactly one was made for the CT) the report names the structure
under each hotspot.<br><br>
<b>The embedded model <i>medalign-demo</i> was trained on synthetic CT phantoms: it is a
demonstration, not a clinical tool.</b> Research use only; not for clinical decisions.
From the Python console: <code>slicer.util.getModuleLogic("MedAlign").screen(volumeNode,
findings=["Lung nodule"])</code>.
See <a href="https://github.com/SlicerMedAlign/SlicerMedAlign">the project page</a>.
""")
        self.parent.acknowledgementText = _("""
MedAlign follows the Bridged Semantic Alignment design (knowledge bank with cross-modal
knowledge interaction) of H. Lai, Z. Jiang, Q. Yao, R. Wang, Z. He, X. Tao, W. Lv, W. Wei
and S. K. Zhou, "Bridged Semantic Alignment for Zero-shot 3D Medical Image Diagnosis"
(BrgSA, arXiv:2501.03565), and loads CT-CLIP checkpoints trained on CT-RATE by
I. E. Hamamci et al., "Developing Generalist Foundation Models from a Multimodal Dataset
for 3D Computed Tomography" (CT-CLIP / CT-RATE, arXiv:2403.17834). Text embeddings use
all-MiniLM-L6-v2 (sentence-transformers).
""")


#
# Parameter node
#


@parameterNodeWrapper
class MedAlignParameterNode:
    """Everything the panel shows, saved with the scene."""

    inputVolume: vtkMRMLScalarVolumeNode
    model: Annotated[str, Default(DEFAULT_MODEL)]
    findings: list[str]
    customFindings: str
    device: Annotated[str, Choice(DEVICES), Default("auto")]
    adapterPath: str  # a medalign adapt file ("" = none): the adapter picker, bound in MedAlignWidget.setup
    opacity: Annotated[float, WithinRange(0.0, 1.0), Default(0.5)]
    threshold: Annotated[float, WithinRange(0.0, 1.0), Default(0.5)]
    resultTable: vtkMRMLTableNode
    shownFinding: str
    # The report's anatomy (None: the export picks the one segmentation made for the CT).
    # typing.Union with None, not "|": the wrapper takes node unions only as typing.Union
    # (parameterNodeWrapper/util.py:56-73 at v5.8.1, "the None is necessary"); the combo
    # box connector sets its nodeTypes from these (guiConnectors.py:676-706, util.py:78-95).
    anatomy: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]  # noqa: UP007


#
# MedAlignWidget
#


def _bytes(byteArray) -> bytes:
    """QByteArray from QProcess -> bytes (PythonQt's ``data()`` gives bytes)."""
    data = byteArray.data() if hasattr(byteArray, "data") else bytes(byteArray)
    return data if isinstance(data, bytes) else str(data).encode("utf-8")


class QtChildProcess:
    """``MedAlignLib.processes.ChildProcess`` on ``qt.QProcess``: the run controller's events
    come from the Qt event loop. A program that cannot start is reported through
    ``errorOccurred(FailedToStart)`` and never through ``finished`` (Qt emits ``finished``
    only for a process that was running), so both signals end a run."""

    def __init__(self) -> None:
        self._process = None

    def start(self, argv, env, events) -> None:
        process = qt.QProcess()
        environment = qt.QProcessEnvironment()  # env is complete (os.environ + the child's settings)
        for key, value in env.items():
            environment.insert(key, value)
        process.setProcessEnvironment(environment)
        process.connect("readyReadStandardOutput()", lambda: events.on_stdout(_bytes(process.readAllStandardOutput())))
        process.connect("readyReadStandardError()", lambda: events.on_stderr(_bytes(process.readAllStandardError())))
        process.connect("finished(int,QProcess::ExitStatus)", lambda code, status: self._finished(events, code, status))
        process.connect("errorOccurred(QProcess::ProcessError)", lambda error: self._error(events, error))
        self._process = process
        process.start(argv[0], list(argv[1:]))

    def _finished(self, events, exitCode, exitStatus) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        events.on_stdout(_bytes(process.readAllStandardOutput()))
        events.on_stderr(_bytes(process.readAllStandardError()))
        events.on_finished(int(exitCode), exitStatus == qt.QProcess.CrashExit)
        process.deleteLater()  # not deleted inside its own signal

    def _error(self, events, error) -> None:
        if error != qt.QProcess.FailedToStart or self._process is None:
            return  # Crashed is followed by finished(CrashExit)
        process, self._process = self._process, None
        events.on_failed_to_start(process.errorString())
        process.deleteLater()

    def pid(self):
        """The child's pid; waits out the short Starting state, where Qt reports pid 0."""
        if self._process is not None and self._process.state() == qt.QProcess.Starting:
            self._process.waitForStarted(5000)  # may report FailedToStart, which ends the run
        return int(self._process.processId()) or None if self._process is not None else None

    def wait_finished(self, timeout_s: float) -> bool:
        if self._process is not None:
            self._process.waitForFinished(int(timeout_s * 1000))
        return self._process is None


class MedAlignWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._display = None  # MedAlignLib.DisplayController: the overlay follows the parameter node
        self.runs = None  # MedAlignLib.RunController: every decision about a run
        self._updatingFindings = False
        self._screenToolTip = ""  # the .ui's, shown again once the adapter fits

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedAlign.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedAlignLogic()
        self.runs = MedAlignLib.RunController(
            self.logic.lib, QtChildProcess, on_progress=self.onRunProgress, on_state=self.onRunState,
            on_done=self.onRunDone, panel_active=lambda: bool(self.parent.isEntered))

        self.ui.progressBar.setVisible(False)
        self.ui.progressBar.setRange(0, 1000)
        self.ui.resultsTableView.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.ui.resultsTableView.setSelectionMode(qt.QAbstractItemView.SingleSelection)
        self.ui.resultsTableView.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        # The adapter picker offers adapter files only (nameFilters as Slicer's ScreenCapture.py:391 at v5.8.1).
        self.ui.adapterPathLineEdit.nameFilters = ["*.safetensors"]
        self._screenToolTip = self.ui.screenButton.toolTip
        self.populateModels()
        self.populateFindings()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onSceneNodeAdded)
        slicer.app.connect("aboutToQuit()", self.onAboutToQuit)

        self.ui.screenButton.connect("clicked(bool)", self.onScreenButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        # The adapter path is bound by hand, not through SlicerParameterName: Slicer's ctkPathLineEdit
        # connector takes pathlib.Path parameters only (parameterNodeWrapper/guiConnectors.py:605-612 at
        # v5.8.1) and an empty Path reads as "." (tests/test_slicer_parameter_node_wrapper_guis.py:727-728),
        # while "no adapter" must stay "". Same signal as that connector's (guiConnectors.py:625).
        self.ui.adapterPathLineEdit.connect("currentPathChanged(QString)", self.onAdapterPathChanged)
        self.ui.clearAdapterButton.connect("clicked()", self.onClearAdapter)
        self.ui.findingsListWidget.connect("itemChanged(QListWidgetItem*)", self.onFindingItemChanged)
        self.ui.ctRateButton.connect("clicked()", lambda: self.checkFindings(self.logic.findingPreset("ct-rate")))
        self.ui.ctRateLtButton.connect("clicked()", lambda: self.checkFindings(self.logic.findingPreset("ct-rate-lt")))
        self.ui.clearFindingsButton.connect("clicked()", lambda: self.checkFindings([]))
        # Clicks and arrow keys both change the selection (qMRMLTableView.h:107-108 at v5.8.1).
        # The sliders need no slot: the display controller follows the parameter node
        # their connectors write to.
        self.ui.resultsTableView.connect("selectionChanged()", self.onResultSelectionChanged)
        self.ui.hotspotToSegmentButton.connect("clicked()", self.onHotspotToSegment)
        self.ui.exportButton.connect("clicked()", self.onExport)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.disconnectParameterNode()
        self.onAboutToQuit()
        slicer.app.disconnect("aboutToQuit()", self.onAboutToQuit)
        self.removeObservers()

    def onAboutToQuit(self) -> None:
        """Slicer is closing (or the module reloads): no background process may outlive it
        (a download's partial file stays; the next download resumes it)."""
        if self.runs is not None:
            self.runs.cancel(None if self.runs.downloading else "Slicer is closing; screening was cancelled.")

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.disconnectParameterNode()

    def onSceneStartClose(self, caller, event) -> None:
        # The controller observes the scene too (this is idempotent); a model download
        # belongs to no scene and goes on.
        if self.runs is not None and not self.runs.downloading:
            self.runs.cancel("The scene was closed; screening was cancelled and nothing was created.")
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        self.updateInputSelectorFilter()
        if not MedAlignLib.is_screenable_volume(self._parameterNode.inputVolume):
            first = MedAlignLib.first_screenable_volume(slicer.mrmlScene)  # never a MedAlign map
            if first is not None:
                self._parameterNode.inputVolume = first
        if not self._parameterNode.findings and not self._parameterNode.customFindings:
            self._parameterNode.findings = self.logic.findingPreset("ct-rate")

    def setParameterNode(self, inputParameterNode) -> None:
        self.disconnectParameterNode()
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(self.parameterWidgets())
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self._display = MedAlignLib.DisplayController(self.logic.lib, self._parameterNode.parameterNode,
                                                          self.showStatus)
        self.updateGUIFromParameterNode()

    def parameterWidgets(self) -> dict:
        """{parameter name: widget} of the .ui's widgets that carry a SlicerParameterName.

        Why not ``connectGui(self.ui)``: before Slicer 5.10 it returns no tag
        (parameterNodeWrapper/wrapper.py:241-253 at v5.8.1; fixed in b5a65a49), so
        ``disconnectGui`` had nothing to remove and connectors piled up on every ``enter()``.
        ``connectParametersToGui`` returns the tag in 5.8 and later (wrapper.py:194-213);
        this is the same widget search as ``connectGui``'s (wrapper.py:247-251).
        """
        widgets = {}
        for widget in vars(self.ui).values():
            name = widget.property("SlicerParameterName") if hasattr(widget, "property") else None
            if name:
                widgets[name] = widget
        return widgets

    def disconnectParameterNode(self) -> None:
        """Undo ``setParameterNode``: GUI connectors, GUI observer and the display controller."""
        if self._display is not None:
            self._display.close()
            self._display = None
        if self._parameterNode:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNodeGuiTag = None

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        """Parts the automatic GUI binding cannot do: model list, finding ticks, table, buttons."""
        p = self._parameterNode
        if p is None:
            return
        index = self.ui.modelComboBox.findData(p.model)
        if index >= 0 and index != self.ui.modelComboBox.currentIndex:
            # Showing the saved choice is not a new choice: no download question for it
            # (blockSignals as in Slicer's effects, SegmentEditorEffect.py:70-72 at v5.8.1).
            wasBlocked = self.ui.modelComboBox.blockSignals(True)
            self.ui.modelComboBox.currentIndex = index
            self.ui.modelComboBox.blockSignals(wasBlocked)
        self._updatingFindings = True
        checked = set(p.findings)
        for row in range(self.ui.findingsListWidget.count):
            item = self.ui.findingsListWidget.item(row)
            item.setCheckState(qt.Qt.Checked if item.text() in checked else qt.Qt.Unchecked)
        self._updatingFindings = False
        if self.ui.resultsTableView.mrmlTableNode() is not p.resultTable:
            self.ui.resultsTableView.setMRMLTableNode(p.resultTable)
        adapterUsable = self.updateAdapterGUI(p)
        running = self.runs is not None and self.runs.running
        downloading = self.runs is not None and self.runs.downloading
        installing = self.runs is not None and self.runs.state is MedAlignLib.RunState.INSTALLING
        # While a model downloads, the one button is its Cancel: Screen waits for the weights.
        self.ui.screenButton.text = "Cancel download" if downloading else "Cancel" if running else "Screen"
        self.ui.screenButton.enabled = not installing and (running or (bool(p.inputVolume) and adapterUsable))
        self.ui.screenButton.toolTip = (self._screenToolTip if running or adapterUsable
                                        else f"Screen is off: {self.ui.adapterStatusLabel.text}")
        self.ui.modelComboBox.enabled = not running and not installing
        self.ui.adapterPathLineEdit.enabled = not running and not installing
        self.ui.clearAdapterButton.enabled = not running and not installing and bool(p.adapterPath)
        self.ui.progressBar.setVisible(running)
        hasResults = p.resultTable is not None
        self.ui.hotspotToSegmentButton.enabled = hasResults and not running
        self.ui.exportButton.enabled = hasResults and not running

    # ------------------------------------------------------------------ lists
    def populateModels(self) -> None:
        """Every model under its label ("COLIPRI — MIT · 1.2 GB · not downloaded", from
        ``MedAlignLib.model_choices``, shared with the web viewer), its name as item data
        (``addItem(text, userData)``, ``itemData``, ``findData``: Slicer v5.8.1
        SegmentEditorSmoothingEffect.py:49, 128, 152). Refilling is not a choice: signals
        are blocked, so no download question comes from it."""
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for choice in MedAlignLib.model_choices():
            combo.addItem(choice.label, choice.name)
            tip = f"{choice.description}\nTrained on: {choice.trained_on}" if choice.trained_on else choice.description
            combo.setItemData(combo.count - 1, tip, qt.Qt.ToolTipRole)
        if self._parameterNode is not None:
            combo.currentIndex = max(0, combo.findData(self._parameterNode.model))
        combo.blockSignals(wasBlocked)

    def populateFindings(self) -> None:
        self.ui.findingsListWidget.clear()
        names = self.logic.findingPreset("ct-rate") + self.logic.findingPreset("ct-rate-lt")
        for name in names:
            item = qt.QListWidgetItem(name)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Unchecked)
            self.ui.findingsListWidget.addItem(item)

    def onModelChanged(self, index: int) -> None:
        """The user chose a model: remember it, and if its weights are not here, ask once
        whether to download them now."""
        if self._parameterNode is None or index < 0:
            return
        name = self.ui.modelComboBox.itemData(index)
        self._parameterNode.model = name
        self.offerDownload(name)

    def offerDownload(self, name: str) -> bool:
        """Ask once (``confirmOkCancelDisplay``: OK in testing mode; Slicer v5.8.1
        Base/Python/slicer/util.py:2992) and start the background download; True when one
        started. Progress, Cancel and the outcome come through the run controller."""
        if not MedAlignLib.needs_download(name):
            return False
        choice = MedAlignLib.model_choice(name)
        if not slicer.util.confirmOkCancelDisplay(MedAlignLib.download_question(choice),
                                                  windowTitle="MedAlign: download model"):
            self.ui.statusLabel.text = f"Model {choice.title} is not downloaded; press Screen to be asked again."
            return False
        with slicer.util.tryWithErrorDisplay("Could not start the download.", waitCursor=True):
            with self.runs.installing():  # the download child needs huggingface_hub & co. too
                installed = self.logic.installDependencies(askConfirmation=True)
            if not installed:
                self.ui.statusLabel.text = "MedAlign needs its Python packages to download a model."
                return False
            self.runs.start_download(name)
            return True
        return False

    def updateAdapterGUI(self, p) -> bool:
        """Picker text from the parameter node (signals blocked: showing it is not a new
        choice) and the line under it (``MedAlignLib.adapter_status``: the adapter's
        description, or the sentence why it cannot screen with the chosen model, read from
        the file's header alone); returns whether Screen may run with it."""
        picker = self.ui.adapterPathLineEdit
        if picker.currentPath != p.adapterPath:
            wasBlocked = picker.blockSignals(True)
            picker.currentPath = p.adapterPath
            picker.blockSignals(wasBlocked)
        line, usable = MedAlignLib.adapter_status(p.adapterPath, p.model)
        self.ui.adapterStatusLabel.text = line
        return usable

    def onAdapterPathChanged(self, path: str) -> None:
        """A file was picked or typed: it becomes the parameter node's adapter."""
        if self._parameterNode is not None and self._parameterNode.adapterPath != path:
            self._parameterNode.adapterPath = path

    def onClearAdapter(self) -> None:
        """"None": screen with the model's own prompts."""
        if self._parameterNode is not None:
            self._parameterNode.adapterPath = ""

    def onFindingItemChanged(self, item) -> None:
        if self._updatingFindings or self._parameterNode is None:
            return
        self._parameterNode.findings = [
            self.ui.findingsListWidget.item(row).text()
            for row in range(self.ui.findingsListWidget.count)
            if self.ui.findingsListWidget.item(row).checkState() == qt.Qt.Checked
        ]

    def checkFindings(self, names: list) -> None:
        if self._parameterNode is not None:
            self._parameterNode.findings = list(names)

    # ------------------------------------------------------------------ screening
    def onScreenButton(self) -> None:
        """Screen, or Cancel while a run is going (the button's text says which)."""
        if self.runs.running:
            self.ui.statusLabel.text = "Cancelling..."
            self.runs.cancel()
            return
        # Any error (not only MedAlignError) gets a dialog; the controller has already
        # removed the work folder and is idle again when it propagates.
        with slicer.util.tryWithErrorDisplay("Could not start the screening.", waitCursor=True):
            self.startScreening()

    def startScreening(self) -> None:
        p = self._parameterNode
        with self.runs.installing():  # a click while pip runs (Slicer 5.8 processes events) is refused
            installed = self.logic.installDependencies(askConfirmation=True)
        if not installed:
            self.ui.statusLabel.text = "MedAlign needs its Python packages to screen."
            return
        if self.ui.findingsListWidget.count == 0:
            self.populateFindings()
            self.updateGUIFromParameterNode()
        if MedAlignLib.needs_download(p.model):  # declined before: ask again instead of screening
            self.offerDownload(p.model)
            return
        findings = self.logic.findingList(list(p.findings), p.customFindings)
        self.runs.logic = self.logic.lib
        self.runs.start(p.inputVolume, findings, p.model, p.device, adapter=p.adapterPath or None)

    def onRunProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(1000 * fraction))
        self.ui.statusLabel.text = message

    def onRunState(self, state) -> None:
        self.updateGUIFromParameterNode()

    def onRunDone(self, outcome) -> None:
        """Results into the parameter node; the map only if the panel is shown (decided by
        the controller: a run ending while the user is elsewhere leaves their views alone).
        After a download the model labels are read again (its status changed)."""
        if outcome.kind == "download":
            self.populateModels()
        p = self._parameterNode
        if outcome.table is not None and p is not None:
            if outcome.show_finding:
                self.showResults(outcome.table)
            else:
                p.resultTable = outcome.table
        self.ui.statusLabel.text = outcome.message
        if outcome.status == "failed":
            slicer.util.errorDisplay(outcome.message)  # only logged in testing mode
        self.updateGUIFromParameterNode()

    # ------------------------------------------------------------------ results
    def onSceneNodeAdded(self, caller, event) -> None:
        self.updateInputSelectorFilter()

    def updateInputSelectorFilter(self) -> None:
        """Hide MedAlign's own map volumes from the CT selector."""
        proxy = self.ui.inputVolumeSelector.sortFilterProxyModel()
        hidden = MedAlignLib.hidden_input_ids(slicer.mrmlScene)
        if list(proxy.hiddenNodeIDs) != hidden:
            proxy.hiddenNodeIDs = hidden

    def showStatus(self, message: str) -> None:
        self.ui.statusLabel.text = message

    def onResultSelectionChanged(self) -> None:
        """Overlay the finding of the selected row (the view's current index, a sort-proxy index)."""
        view, p = self.ui.resultsTableView, self._parameterNode
        index = view.selectionModel().currentIndex() if view.selectionModel() else None
        if p is None or self._display is None or index is None or not index.isValid():
            return
        row = view.sortFilterProxyModel().mapToSource(index).row()
        finding = MedAlignLib.finding_at_view_row(p.resultTable, row)
        if finding:
            self._display.show(finding)

    def showResults(self, table) -> None:
        """A new results table, its top finding overlaid (one parameter node update)."""
        p = self._parameterNode
        with slicer.util.NodeModify(p.parameterNode):
            p.resultTable = table
            p.shownFinding = table.GetCellText(0, 0) if table.GetNumberOfRows() else ""

    def onHotspotToSegment(self) -> None:
        p = self._parameterNode
        finding = p.shownFinding or p.resultTable.GetCellText(0, 0)
        with slicer.util.tryWithErrorDisplay("Could not create the hotspot segment.", waitCursor=True):
            segmentation, segmentId = self.logic.hotspotToSegment(finding, threshold=p.threshold, table=p.resultTable)
            self.ui.statusLabel.text = f"Segment '{finding}' added to {segmentation.GetName()}."

    def onExport(self) -> None:
        p = self._parameterNode
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Export MedAlign report to folder")
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay("Could not export the report.", waitCursor=True):
            # A bad anatomy segmentation is no error: the report says why it was not used,
            # and so does the status line (read back from the written report).
            out = self.logic.export(p.resultTable, folder, segmentation=p.anatomy)
            self.ui.statusLabel.text = MedAlignLib.export_summary(out)


#
# MedAlignLogic
#


class MedAlignLogic(ScriptedLoadableModuleLogic):
    """Slicer-facing logic: wraps ``MedAlignLib.ScreeningLogic(slicer.mrmlScene)``.

    ``slicer.util.getModuleLogic("MedAlign").screen(volumeNode, findings=[...])`` runs the
    same work as the Screen button (in this process) and returns the ``ScreeningResult``.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._lib = None

    @property
    def lib(self) -> MedAlignLib.ScreeningLogic:
        if self._lib is None or self._lib.scene is not slicer.mrmlScene:
            self._lib = MedAlignLib.ScreeningLogic(slicer.mrmlScene)
        return self._lib

    def getParameterNode(self):
        return MedAlignParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ dependencies
    def missingDependencies(self) -> list:
        """Import names of required packages that are missing or too old."""
        return MedAlignLib.missing_dependencies()

    def installDependencies(self, askConfirmation: bool = True) -> bool:
        """Install what is missing or too old after ONE confirmation; False if the user declines.

        The plan comes from ``MedAlignLib.dependencies`` (tested without Slicer): torch only
        through the PyTorch extension, numpy/SimpleITK/torch never replaced by pip (a
        constraints file pins them), anything it may not fix is one sentence.
        """
        deps = MedAlignLib.dependencies
        problems = deps.dependency_problems()
        if not problems:
            return True
        plan = deps.plan_install(problems, torch_extension=deps.torch_extension_available())
        if plan.refused:
            raise MedAlignError(" ".join(plan.refused))
        listed = ", ".join(problem.describe() for problem in problems)
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            f"MedAlign needs Python packages that are missing or too old: {listed}.\n\n"
            "Install them now? PyTorch alone is a large download; this can take several minutes.",
            windowTitle="MedAlign: install dependencies",
        ):
            return False
        with slicer.util.WaitCursor():
            if plan.torch:
                self._installTorch(plan.torch)
            if plan.pip:
                with tempfile.TemporaryDirectory(prefix="medalign-pip-") as folder:
                    # a list reaches pip unchanged in Slicer 5.8 (util.py pip_install) and later (packaging.py)
                    slicer.util.pip_install([*plan.pip, "-c", str(deps.write_constraints(folder))])
        importlib.invalidate_caches()
        still = deps.dependency_problems()
        if still:
            raise MedAlignError(f"Could not install {', '.join(p.describe() for p in still)}; "
                                "see the Python console for pip's message.")
        return True

    @staticmethod
    def _installTorch(versionRequirement: str) -> None:
        """PyTorch through the PyTorch extension, which picks the build for the machine's GPU."""
        import PyTorchUtils

        # The user already confirmed the whole installation once: no second dialog here.
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                              torchVersionRequirement=versionRequirement)
        if torch is None:
            raise MedAlignError("PyTorch could not be installed; install it from the PyTorch Utils module and try again.")

    # ------------------------------------------------------------------ choices
    @staticmethod
    def models() -> list:
        """(name, description) of every registered model."""
        from medalign.models.registry import list_models

        return [(entry.name, entry.description) for entry in list_models()]

    @staticmethod
    def findingPreset(name: str) -> list:
        """"ct-rate" (18 findings) or "ct-rate-lt" (15 rarer ones); [] until PyYAML exists."""
        try:
            from medalign.knowledge.findings import CT_RATE_FINDINGS, CT_RATE_LT_FINDINGS
        except ImportError:  # knowledge base needs PyYAML, installed on first use
            return []
        return list({"ct-rate": CT_RATE_FINDINGS, "ct-rate-lt": CT_RATE_LT_FINDINGS}[name])

    @staticmethod
    def findingList(checked: list, customText: str = "") -> list:
        """Ticked findings plus free-text ones (';'-separated), without duplicates."""
        out = []
        for name in list(checked) + [s.strip() for s in (customText or "").split(";")]:
            if name and name.lower() not in {o.lower() for o in out}:
                out.append(name)
        if not out:
            raise MedAlignError("Tick at least one finding or type one as free text.")
        return out

    # ------------------------------------------------------------------ work
    def screen(self, volumeNode, findings=None, model=None, device: str = "auto", progress=None, cancel=None,
               adapter=None):
        """Screen ``volumeNode`` in this process; creates the same nodes as the Screen button.
        ``adapter``: a ``medalign adapt`` file, as the panel's Adapter row."""
        if not self.installDependencies(askConfirmation=True):
            raise MedAlignError("MedAlign needs its Python packages; they were not installed.")
        return self.lib.screen(volumeNode, findings=findings, model=model, device=device, progress=progress,
                               cancel=cancel, adapter=adapter)

    def resultTableNode(self):
        """Results table of the latest run (None before any)."""
        return self.lib.last_table

    def backgroundScreening(self, volumeNode, findings, model=None, device: str = "auto"):
        if volumeNode is None:
            raise MedAlignError("Select a CT volume to screen.")
        return MedAlignLib.BackgroundScreening(volumeNode, findings=findings, model=model or None, device=device)

    def showMap(self, finding, opacity: float = 0.5, threshold=None, table=None):
        return self.lib.show_map(finding, opacity=opacity, threshold=threshold, table=table)

    def hotspotToSegment(self, finding, segmentationNode=None, threshold=None, table=None):
        return self.lib.hotspot_to_segment(finding, segmentationNode=segmentationNode, table=table, threshold=threshold)

    def export(self, resultOrTable, outDir, segmentation=None):
        """Structured report, results and maps into ``outDir``; ``segmentation`` (a
        segmentation or labelmap volume node) names the structure under each hotspot, None
        picks the one segmentation made for the screened CT, if there is exactly one."""
        table = resultOrTable if resultOrTable is not None else self.lib.last_table
        return self.lib.export(table, outDir, segmentation=segmentation)


#
# MedAlignTest
#


class MedAlignTest(ScriptedLoadableModuleTest):
    """Screens a synthetic chest CT as a console user would, then drives the panel: Screen,
    click each row, Cancel mid-run. The decisions are MedAlignLib.RunController's, tested
    headless in Testing/python/test_run_controller.py; this is a thin driver of the Qt side.
    Without the Python packages it skips inference and says why (no network install in a test)."""

    FINDINGS = ["Lung nodule", "Pleural effusion", "Cardiomegaly"]
    TIMEOUT_S = 600

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        if self.skippedForDependencies():
            return
        self.setUp()
        self.test_ScreenPhantom()
        self.setUp()
        self.test_PanelScreenRowsAndCancel()

    def skippedForDependencies(self) -> bool:
        problems = MedAlignLib.dependency_problems()
        if problems:
            message = ("MedAlign self-test: inference skipped, these Python packages are missing or too old: "
                       + ", ".join(problem.describe() for problem in problems)
                       + ". Press Screen once in the MedAlign panel to install them, then rerun the test.")
            logging.warning(message)
            self.delayDisplay(message)
        return bool(problems)

    def loadPhantom(self):
        from medalign.core.volume_io import write_volume
        from medalign.synth.phantoms import make_phantom

        phantom = make_phantom(seed=11, labels={"Lung nodule": 1, "Pleural effusion": 1, "Cardiomegaly": 0},
                               spacing=(2.0, 2.0, 4.0))
        path = os.path.join(slicer.app.temporaryPath, "MedAlignTestPhantom.nii.gz")
        write_volume(phantom.volume, path)
        return slicer.util.loadVolume(path)

    def waitUntil(self, condition, what: str) -> None:
        deadline = time.monotonic() + self.TIMEOUT_S
        while not condition():
            self.assertLess(time.monotonic(), deadline, f"timed out waiting for {what}")
            slicer.app.processEvents()
            time.sleep(0.02)

    def test_PanelScreenRowsAndCancel(self):
        import psutil

        slicer.util.selectModule("MedAlign")
        widget = slicer.modules.medalign.widgetRepresentation().self()
        volumeNode = self.loadPhantom()
        p = widget._parameterNode
        p.inputVolume, p.findings, p.customFindings, p.device = volumeNode, self.FINDINGS, "", "cpu"

        combo = widget.ui.modelComboBox  # labels from MedAlignLib.model_choices, names as item data
        self.assertEqual({combo.itemData(i): combo.itemText(i) for i in range(combo.count)},
                         {choice.name: choice.label for choice in MedAlignLib.model_choices()})
        self.assertEqual(combo.itemData(combo.currentIndex), p.model)

        self.delayDisplay("An adapter that does not fit turns Screen off and says why")
        missing = os.path.join(slicer.app.temporaryPath, "MedAlignTestNoSuchAdapter.safetensors")
        widget.ui.adapterPathLineEdit.currentPath = missing  # as if picked: the picker writes the parameter
        self.assertEqual(p.adapterPath, missing)
        line, usable = MedAlignLib.adapter_status(missing, p.model)
        self.assertFalse(usable)
        self.assertEqual(widget.ui.adapterStatusLabel.text, line)
        self.assertFalse(widget.ui.screenButton.enabled)
        widget.ui.clearAdapterButton.click()
        self.assertEqual((p.adapterPath, widget.ui.adapterPathLineEdit.currentPath), ("", ""))
        self.assertEqual(widget.ui.adapterStatusLabel.text, MedAlignLib.adapter_status("", p.model)[0])
        self.assertTrue(widget.ui.screenButton.enabled)

        self.delayDisplay("Screen from the panel")
        widget.ui.screenButton.click()
        self.waitUntil(lambda: not widget.runs.running, "the screening to end")
        self.assertEqual(widget.runs.last_outcome.status, "done", widget.runs.last_outcome.message)
        table = p.resultTable
        self.assertEqual(table.GetNumberOfRows(), len(self.FINDINGS))
        lib = widget.logic.lib
        for row in range(table.GetNumberOfRows()):
            widget.onResultClicked(widget.ui.resultsTableView.model().index(row, 0))
            mapNode = lib.map_node(lib.finding_at_row(table, row), table)
            for name in ("Red", "Yellow", "Green"):
                composite = slicer.app.layoutManager().sliceWidget(name).sliceLogic().GetSliceCompositeNode()
                self.assertEqual(composite.GetForegroundVolumeID(), mapNode.GetID())

        self.delayDisplay("Cancel mid-run")
        nodesBefore = {node.GetID() for node in slicer.util.getNodesByClass("vtkMRMLNode")}
        widget.ui.screenButton.click()
        self.waitUntil(lambda: widget.runs.process is not None and widget.runs.process.pid(), "the child to start")
        root = psutil.Process(widget.runs.process.pid())
        self.waitUntil(lambda: widget.ui.progressBar.value > 0, "the first progress line")
        pids = [root.pid] + [child.pid for child in root.children(recursive=True)]
        widget.ui.screenButton.click()  # reads "Cancel" while running
        self.assertFalse(widget.runs.running)
        self.assertEqual(widget.runs.last_outcome.status, "cancelled")
        self.waitUntil(lambda: not any(psutil.pid_exists(pid) for pid in pids), "the process tree to end")
        self.assertEqual({node.GetID() for node in slicer.util.getNodesByClass("vtkMRMLNode")}, nodesBefore)
        self.delayDisplay("Panel test passed")

    def test_ScreenPhantom(self):
        import numpy as np

        logic = slicer.util.getModuleLogic("MedAlign")  # what console users get
        self.delayDisplay("Loading a synthetic chest CT")
        volumeNode = self.loadPhantom()
        before = slicer.util.arrayFromVolume(volumeNode).copy()
        matrixBefore = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrixBefore)

        self.delayDisplay("Screening")
        result = logic.screen(volumeNode, findings=self.FINDINGS, device="cpu")
        table = logic.resultTableNode()
        self.assertEqual(table.GetNumberOfRows(), len(self.FINDINGS))
        self.assertEqual({table.GetCellText(r, 0) for r in range(table.GetNumberOfRows())}, set(self.FINDINGS))

        maps = logic.lib.map_nodes(table)
        for name in self.FINDINGS:
            mapNode, engineMap = maps[name], result.finding(name).map
            self.assertEqual(tuple(mapNode.GetImageData().GetDimensions()), tuple(engineMap.shape_ijk))
            matrix = vtk.vtkMatrix4x4()
            mapNode.GetIJKToRASMatrix(matrix)
            for r in range(4):
                for c in range(4):
                    self.assertAlmostEqual(matrix.GetElement(r, c), engineMap.ijk_to_ras[r, c], places=4)

        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volumeNode), before)
        matrixAfter = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrixAfter)
        self.assertTrue(all(matrixAfter.GetElement(r, c) == matrixBefore.GetElement(r, c)
                            for r in range(4) for c in range(4)))

        self.delayDisplay("Overlay, segment and export")
        shown = logic.showMap("Lung nodule", opacity=0.4)
        composite = slicer.app.layoutManager().sliceWidget("Red").sliceLogic().GetSliceCompositeNode()
        self.assertEqual(composite.GetForegroundVolumeID(), shown.GetID())
        self.assertEqual(composite.GetBackgroundVolumeID(), volumeNode.GetID())
        segmentation, segmentId = logic.hotspotToSegment("Lung nodule")
        self.assertEqual(segmentation.GetSegmentation().GetSegment(segmentId).GetName(), "Lung nodule")
        outDir = os.path.join(slicer.app.temporaryPath, "MedAlignTestExport")
        logic.export(table, outDir)
        with open(os.path.join(outDir, "report.json"), encoding="utf-8") as f:
            report = json.load(f)
        # MedAlign's own hotspot segments are no anatomy: no automatic pick
        self.assertEqual(report["anatomy_source"], "relative position in the scan")
        logic.export(table, outDir, segmentation=segmentation)  # chosen, it is used
        with open(os.path.join(outDir, "report.json"), encoding="utf-8") as f:
            report = json.load(f)
        self.assertEqual(report["anatomy_source"], f"segmentation '{segmentation.GetName()}'")
        self.assertIsNone(report["anatomy_note"])
        self.delayDisplay("Test passed")
