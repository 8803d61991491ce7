"""A perceptual colour map for alignment maps, available in every scene.

Real Slicer ships a file-based ``Inferno`` colour table, slicer-core (the headless MRML
used by the tests and the web viewer) does not; a display node pointing at a missing
colour node renders nothing.  So the glue uses Slicer's own Inferno when the scene has
it and otherwise builds "MedAlign Inferno" from a small polynomial fitted once to
matplotlib's inferno (max error 0.021 per channel, luminance strictly increasing), which
keeps the module free of a matplotlib dependency and of vendored colour tables.
"""

from __future__ import annotations

import numpy as np

from .scene_queries import nodes_of_class

COLOR_NODE_NAME = "MedAlign Inferno"
# Node IDs / names real Slicer gives its own perceptual tables (preferred when present).
_SLICER_INFERNO = ("vtkMRMLColorTableNodeFileInferno.txt", "Inferno")

# Degree-7 polynomial per channel, coefficients of t**0 .. t**7 (t in [0, 1]).
_INFERNO_POLY = (
    (0.00029, 0.10145, 11.67787, -42.04922, 78.09552, -72.64073, 26.07045, -0.27938),
    (-0.01123, 1.32659, -14.37827, 75.81556, -194.45428, 264.83412, -180.08695, 47.96137),
    (0.01912, 0.79274, 29.36525, -210.60842, 622.11890, -942.39117, 711.11453, -209.78005),
)


def inferno_rgb(n: int = 256) -> np.ndarray:
    """(n, 3) float RGB in [0, 1] approximating matplotlib's inferno."""
    t = np.linspace(0.0, 1.0, n)
    rgb = np.stack([np.polynomial.polynomial.polyval(t, c) for c in _INFERNO_POLY], axis=1)
    return np.clip(rgb, 0.0, 1.0)


def find_color_node(scene):
    """Slicer's Inferno if the scene has it, else a previously created MedAlign Inferno, else None."""
    node = scene.GetNodeByID(_SLICER_INFERNO[0])
    if node is not None:
        return node
    for name in (_SLICER_INFERNO[1], COLOR_NODE_NAME):
        nodes = nodes_of_class(scene, "vtkMRMLColorNode", name)
        if nodes:
            return nodes[0]
    return None


def build_color_node():
    """A new (not yet added) 256-entry "MedAlign Inferno" colour table node."""
    from slicer import vtkMRMLColorTableNode

    node = vtkMRMLColorTableNode()
    node.SetName(COLOR_NODE_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    for index, (r, g, b) in enumerate(inferno_rgb(256)):
        node.SetColor(index, "", float(r), float(g), float(b), 1.0)
    node.SetAttribute("Category", "MedAlign")
    return node


def ensure_color_node(scene):
    """The colour node maps use; created (with a storage node so scene saving keeps it) if absent."""
    node = find_color_node(scene)
    if node is not None:
        return node
    node = build_color_node()
    scene.AddNode(node)
    storage = node.CreateDefaultStorageNode()
    if storage is not None:
        scene.AddNode(storage)
        node.SetAndObserveStorageNodeID(storage.GetID())
    return node
