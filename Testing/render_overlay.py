"""Render a CT with a finding's alignment map overlaid, offscreen, through Slicer's own
slice-view pipeline (slicer-core + trame-slicer), for the README's screenshot.

    python Testing/render_overlay.py                       # shared chest CT if present, else a phantom
    python Testing/render_overlay.py --input ct.nii.gz --finding "Pleural effusion" --out picture.png

The picture is what a Slicer user sees after clicking a results row: the CT as background,
the map as foreground (the module's perceptual colour map, below-threshold voxels
transparent) and the colour legend, all drawn by Slicer's own displayable managers. When
the input has an expert box file next to it (``<name>.boxes.json``, as the shared
Lung-PET-CT-Dx case does) the slice goes through the box centre and the box is outlined,
so the picture shows honestly where the lesion is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SlicerMedAlign"))
SHARED_CT = REPO.parent / "shared" / "data" / "real_ct" / "chest_ct_lung_mass.nii.gz"
DEFAULT_OUT = REPO / "Documentation" / "screenshots" / "overlay_axial.png"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", type=Path, default=None, help="CT file (default: the shared chest CT, else a phantom)")
    p.add_argument("--model", default=None, help="registry model name (default: medalign-demo)")
    p.add_argument("--finding", default="Lung nodule")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--size", type=int, default=720, help="square view size in pixels")
    p.add_argument("--opacity", type=float, default=0.55)
    p.add_argument("--threshold", type=float, default=None, help="fraction of the map peak (default: hotspot's)")
    p.add_argument("--window", type=float, nargs=2, default=(1500.0, -550.0), metavar=("WIDTH", "LEVEL"),
                   help="CT window in HU (default: lung window 1500/-550)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def load_input(app, path: Path | None):
    """The CT node and, when available, its expert box (RAS min/max) for the outline."""
    from MedAlignLib import node_from_volume

    if path is None and SHARED_CT.is_file():
        path = SHARED_CT
    if path is not None:
        (node,) = app.io_manager.load_volumes([str(path)])
        boxes = path.with_name(path.name.replace(".nii.gz", "").replace(".nrrd", "") + ".boxes.json")
        box = json.loads(boxes.read_text(encoding="utf-8"))["ras_box_mm"] if boxes.is_file() else None
        caption = f"{path.name}"
        if path == SHARED_CT:
            caption += " (Lung-PET-CT-Dx, TCIA, CC BY 4.0)"
        return node, box, caption
    from medalign.synth.phantoms import make_phantom

    phantom = make_phantom(seed=20261123, labels={"Lung nodule": 1, "Pleural effusion": 1})
    return node_from_volume(app.scene, phantom.volume, "phantom chest CT"), None, "synthetic phantom chest CT"


def ras_to_pixels(slice_node, ras: np.ndarray, height: int) -> np.ndarray:
    """RAS points -> (x, y) pixel positions in the saved PNG (origin top-left)."""
    import vtk

    xy_to_ras = vtk.vtkMatrix4x4()
    xy_to_ras.DeepCopy(slice_node.GetXYToRAS())
    xy_to_ras.Invert()
    out = []
    for point in np.atleast_2d(ras):
        x, y, _z, _w = xy_to_ras.MultiplyPoint((*map(float, point), 1.0))
        out.append((x, height - 1 - y))
    return np.array(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import vtk
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

    from MedAlignLib import ScreeningLogic

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    view = app.view_manager.create_view(ViewLayoutDefinition.axial_view())
    view.render_window().SetSize(args.size, args.size)

    node, box, caption = load_input(app, args.input)
    logic = ScreeningLogic(app.scene)
    result = logic.screen(node, findings=[args.finding], model=args.model, device=args.device)
    finding = result.findings[0]
    map_node = logic.show_map(finding.name, opacity=args.opacity, threshold=args.threshold)

    for index in range(map_node.GetNumberOfDisplayNodes()):  # Slicer's legend, a little smaller
        legend = map_node.GetNthDisplayNode(index)
        if legend.IsA("vtkMRMLColorLegendDisplayNode"):
            legend.SetSize(0.12, 0.42)
    display = node.GetScalarVolumeDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(*args.window)
    view.set_background_volume_id(node.GetID())
    view.set_foreground_volume_id(map_node.GetID())
    view.set_foreground_opacity(args.opacity)
    view.fit_view_to_content()
    z = 0.5 * (box["min"][2] + box["max"][2]) if box else finding.hotspot.ras[2] if finding.hotspot else 0.0
    view.set_slice_value(z)
    view.render()

    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(view.render_window())
    grab.ReadFrontBufferOff()
    grab.Update()
    image = grab.GetOutput()
    width, height, _ = image.GetDimensions()
    from vtk.util import numpy_support

    rgb = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[::-1, :, :3]
    picture = annotate(rgb, view, box, finding, result, caption)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from medalign.core.volume_io import atomic_output

    with atomic_output(args.out) as tmp:
        picture.save(tmp, format="PNG", optimize=True)
    print(f"wrote {args.out} ({finding.name}: p={finding.probability:.2f}, slice S={z:.1f} mm)")
    return 0


def annotate(rgb: np.ndarray, view, box, finding, result, caption: str):
    """Expert box outline and a caption band (PIL) on Slicer's rendering (legend included)."""
    from PIL import Image, ImageDraw, ImageFont

    height, width = rgb.shape[:2]
    slice_node = view.get_view_node() if hasattr(view, "get_view_node") else view.mrml_view_node
    canvas = Image.new("RGB", (width, height + 60), (12, 12, 16))
    canvas.paste(Image.fromarray(np.ascontiguousarray(rgb)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=15)
    if box is not None:
        lo, hi = np.array(box["min"]), np.array(box["max"])
        z = slice_node.GetSliceToRAS().GetElement(2, 3)
        corners = ras_to_pixels(slice_node, np.array([[lo[0], lo[1], z], [hi[0], hi[1], z]]), height)
        (x0, y0), (x1, y1) = corners.min(axis=0), corners.max(axis=0)
        draw.rectangle([x0, y0, x1, y1], outline=(80, 220, 255), width=2)
        draw.text((x0, max(0, y0 - 18)), "expert box", fill=(80, 220, 255), font=font)
    flag = "flagged" if finding.flagged else "not flagged"
    line1 = f"{finding.name}: probability {finding.probability:.2f} +/- {finding.uncertainty:.2f} ({flag}), model {result.model}"
    line2 = f"{caption}. {result.disclaimer or 'Research use only; not for clinical decisions.'}"
    draw.text((10, height + 8), line1, fill=(240, 240, 240), font=font)
    draw.text((10, height + 32), line2, fill=(170, 170, 170), font=font)
    return canvas


if __name__ == "__main__":
    from medalign.core.errors import MedAlignError

    try:
        sys.exit(main())
    except MedAlignError as exc:
        print(f"render_overlay: error: {exc}", file=sys.stderr)
        sys.exit(2)
