"""The page's layout (vuetify 3): a side panel with the screening controls and Slicer's
views (three slices and 3D, rendered on the server) in the main area.

Only layout and bindings live here; every action calls a ``WebViewer`` method. Elements
the browser tests use carry ``data-testid`` attributes.
"""

from __future__ import annotations

from trame.ui.vuetify3 import SinglePageWithDrawerLayout
from trame.widgets import html
from trame.widgets import vuetify3 as v3

RESULT_COLUMNS = (  # (header, tooltip with the full name, test id)
    ("finding", "Finding", "finding"),
    ("p", "Probability of the finding", "probability"),
    ("H", "Uncertainty: entropy of the probability, 0 (sure) to 1 bit (coin toss)", "uncertainty"),
    ("flag", "Flag", "flag"),
    ("AUC", "Held-out AUC of the model for this finding", "auc"),
)


def tid(name: str) -> dict:
    """A ``data-testid`` attribute (trame passes unknown attributes on only when declared)."""
    return {"__properties": [("data_testid", "data-testid")], "data_testid": name}


def build_page(viewer) -> SinglePageWithDrawerLayout:
    server = viewer.server
    with SinglePageWithDrawerLayout(server, full_height=True) as layout:
        layout.title.set_text("MedAlign web viewer")
        with layout.toolbar:
            v3.VSpacer()
            html.Span("Research use only: not for clinical decisions", classes="text-caption mr-4")
        with layout.drawer as drawer:
            drawer.width = 420
            with html.Div(classes="pa-3 d-flex flex-column ga-2"):
                _input_panel(viewer)
                _run_panel(viewer)
                _results_panel(viewer)
        with layout.content, v3.VContainer(fluid=True, classes="pa-0 fill-height", style="position: relative;"):
            viewer.layout_manager.initialize_layout_grid(layout)
    return layout


def _input_panel(viewer) -> None:
    html.Div("CT", classes="text-subtitle-2")
    v3.VSelect(v_if="server_volumes.length", label="CT on the server", v_model=("server_volume",),
               items=("server_volumes",), density="compact", hide_details=True,
               update_modelValue=(viewer.load_server_volume, "[$event]"), **tid("server-volume"))
    with html.Div(classes="d-flex ga-2 align-center"):
        v3.VFileInput(label="Upload a CT (NIfTI, NRRD, MHA, DICOM file)", v_model=("upload",), density="compact",
                      hide_details=True, disabled=("busy",), prepend_icon="mdi-upload", **tid("upload"))
        v3.VBtn("Sample CT", click=viewer.load_sample, disabled=("busy",), size="small", **tid("sample"))
    html.Div("{{ volume_name ? 'Loaded: ' + volume_name : 'No CT loaded' }}", classes="text-caption",
             **tid("volume-name"))


def _run_panel(viewer) -> None:
    v3.VSelect(label="Model", v_model=("model",), items=("models",), density="compact", hide_details=True,
               disabled=("busy",), update_modelValue=(viewer.choose_model, "[$event]"), **tid("model"))
    _download_dialog(viewer)
    v3.VSelect(v_if="adapter_offered", label="Adapter (medalign adapt)", v_model=("adapter",), items=("adapters",),
               density="compact", hide_details=True, disabled=("busy",), **tid("adapter"))
    v3.VSelect(label="Findings preset", v_model=("preset",), items=("presets",), density="compact",
               hide_details=True, disabled=("busy",), **tid("preset"))
    v3.VTextField(label="Free-text findings (separate with ;)", v_model=("free_text",), density="compact",
                  hide_details=True, disabled=("busy",), **tid("free-text"))
    with html.Div(classes="d-flex ga-2"):
        v3.VBtn("Screen", click=(viewer.screen, "[model, preset, free_text, adapter]"), color="primary",
                disabled=("busy || !volume_name",),
                **tid("screen"))
        v3.VBtn("Cancel", click=viewer.cancel, color="error", v_show="busy", **tid("cancel"))
    v3.VProgressLinear(model_value=("progress",), height=8, color="primary", **tid("progress"))
    html.Div("{{ status }}", classes="text-body-2", **tid("status"))
    v3.VAlert(v_show="error", text=("error",), type="error", density="compact", **tid("error"))


def _download_dialog(viewer) -> None:
    """Asked once when a model that is not downloaded is chosen (or Screen is pressed with it)."""
    with v3.VDialog(v_model=("download_dialog",), max_width=520, persistent=True), v3.VCard(**tid("download-dialog")):
        v3.VCardTitle("Download the model?")
        v3.VCardText("{{ download_question }}", **tid("download-question"))
        with v3.VCardActions():
            v3.VSpacer()
            v3.VBtn("Not now", click="download_dialog = false", **tid("download-decline"))
            v3.VBtn("Download", color="primary", click=(viewer.download, "[download_model]"), **tid("download-confirm"))


def _results_panel(viewer) -> None:
    # Short headers (full names as tooltips) and tight cells: all five columns fit the
    # 420 px panel, held-out AUC included, without a horizontal scroll.
    with v3.VTable(density="compact", v_show="rows.length", **tid("results"), height="300px",
                   fixed_header=True, classes="text-caption", style="table-layout: auto;"):
        with html.Thead(), html.Tr():
            for title, tooltip, name in RESULT_COLUMNS:
                html.Th(title, title=tooltip, classes="px-1", **tid(f"column-{name}"))
        with html.Tbody(), html.Tr(v_for="row in rows", key="row.finding", click=(viewer.show, "[row.finding]"),
                     style="cursor: pointer;", classes=("{'bg-blue-grey-darken-3': row.finding === shown}",),
                     **tid("result-row")):
            html.Td("{{ row.finding }}", classes="px-1", style="word-break: break-word;")
            html.Td("{{ row.probability.toFixed(3) }}", classes="px-1")
            html.Td("{{ row.uncertainty.toFixed(3) }}", classes="px-1")
            html.Td("{{ row.flag }}", classes="px-1")
            html.Td("{{ row.auc === null ? '-' : row.auc.toFixed(2) }}", classes="px-1")
    with html.Div(v_show="legend", **tid("legend")):
        html.Div("{{ legend && legend.finding }}: alignment map", classes="text-subtitle-2")
        html.Div(style=("{height: '14px', background: legend_gradient}",))
        with html.Div(classes="d-flex justify-space-between text-caption"):
            html.Span("{{ legend && legend.low.toFixed(2) }}")
            html.Span("shown from {{ legend && legend.threshold.toFixed(2) }}")
            html.Span("{{ legend && legend.high.toFixed(2) }}")
    v3.VSlider(label="Opacity", v_model=("opacity",), update_modelValue=(viewer.set_opacity, "[$event]"),
               min=0, max=1, step=0.05, density="compact", hide_details=True,
               disabled=("!shown",), **tid("opacity"))
    v3.VSlider(label="Threshold", v_model=("threshold",), update_modelValue=(viewer.set_threshold, "[$event]"),
               min=0, max=1, step=0.05, density="compact",
               hide_details=True, disabled=("!shown",), **tid("threshold"))
    with html.Div(classes="d-flex ga-2"):
        v3.VBtn("Hotspot to segment", click=viewer.hotspot, size="small", disabled=("!shown || busy",),
                **tid("hotspot"))
        v3.VBtn("Export report", size="small", disabled=("!rows.length",), **tid("export"),
                click=f"utils.download('medalign-report.zip', trigger('{server_trigger(viewer)}'), 'application/zip')")
    html.Div("{{ screen_seconds === null ? '' : 'Screen to overlay: ' + screen_seconds + ' s' }}",
             classes="text-caption", **tid("timing"))


def server_trigger(viewer) -> str:
    """Name of the export trigger (what ``utils.download`` awaits for the zip)."""
    return viewer.server.controller.trigger_name(viewer.export)
