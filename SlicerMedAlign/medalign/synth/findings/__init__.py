"""Every CT-RATE finding a phantom can show, each module holding a finding's painter
beside its report sentences (or a small group of related findings).

``REGISTRY`` maps finding name -> ``FindingSpec`` in the order the phantom builder
paints them, and that order is part of what a seed means (generator 1.3): fluid first
(it displaces lung), then focal lesions, then diffuse patterns, which fill the free lung
left around them (``PaintContext.blocked``), then the mediastinum and devices. Each
painter draws from its own random stream, spawned in this order. The heart findings come
last: they are drawn with the anatomy (``findings.heart``) and have no painter.
"""

from __future__ import annotations

from medalign.knowledge.findings import CT_RATE_FINDINGS
from medalign.synth.findings import (
    airspace,
    airways,
    atelectasis,
    calcification,
    devices,
    emphysema,
    fibrosis,
    heart,
    hiatal_hernia,
    lung_patterns,
    lymph_nodes,
    nodules,
    pleural,
)
from medalign.synth.findings.spec import FindingSpec, Painter

PAINT_ORDER = (
    "Pleural effusion",
    "Lung nodule",
    "Atelectasis",
    "Consolidation",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Bronchiectasis",
    "Peribronchial thickening",
    "Emphysema",
    "Mosaic attenuation pattern",
    "Interlobular septal thickening",
    "Lymphadenopathy",
    "Hiatal hernia",
    "Arterial wall calcification",
    "Coronary artery wall calcification",
    "Medical material",
)
#: Part of the anatomy itself (see ``findings.heart``).
ANATOMICAL = ("Cardiomegaly", "Pericardial effusion")

_MODULES = (pleural, nodules, atelectasis, airspace, fibrosis, airways, emphysema, lung_patterns, lymph_nodes,
            hiatal_hernia, calcification, devices, heart)
_SPECS = {spec.name: spec for module in _MODULES for spec in module.SPECS}
REGISTRY: dict[str, FindingSpec] = {name: _SPECS[name] for name in PAINT_ORDER + ANATOMICAL}
#: The painters in painting order (one random stream each).
PAINTERS: dict[str, Painter] = {name: REGISTRY[name].paint for name in PAINT_ORDER}

assert set(_SPECS) == set(REGISTRY) == set(CT_RATE_FINDINGS), "every CT-RATE finding has exactly one spec"
assert all(REGISTRY[name].paint is not None for name in PAINT_ORDER)
assert all(REGISTRY[name].paint is None for name in ANATOMICAL)
