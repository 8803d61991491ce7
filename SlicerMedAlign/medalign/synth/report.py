"""CT-RATE-like phantom reports: FINDINGS in CT-RATE's section order, then IMPRESSION.

Each positive finding's sentence comes from its module in ``medalign.synth.findings``;
here are the sections, the normal sentences, the negations and the impression.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medalign.core.errors import MedAlignError
from medalign.knowledge.findings import CT_RATE_FINDINGS, load_knowledge
from medalign.synth.anatomy import Anatomy
from medalign.synth.findings import REGISTRY
from medalign.synth.wording import pick, term


def positive_sentence(rng: np.random.Generator, name: str, f: dict[str, Any], kb: dict) -> str:
    """The finding's own report sentence(s) from its facts; ``term`` draws its name or a synonym."""
    spec = REGISTRY.get(name)
    if spec is None:
        return f"{name} is observed."
    return spec.report(rng, f, lambda k=2: term(rng, kb, name, k))


def negation(rng: np.random.Generator, name: str, kb: dict) -> str:
    """An explicit "no X" sentence, worded as the knowledge base says reports negate X."""
    if name in kb:
        tmpl = pick(rng, list(kb[name].negations))
        if "{finding}" in tmpl:
            # "{finding} was not observed" needs a singular subject: the name itself
            word = name if tmpl.startswith("{finding}") else pick(rng, [name] + list(kb[name].synonyms[:1])).lower()
            text = tmpl.replace("{finding}", word)
            return text[0].upper() + text[1:]
        return tmpl
    return pick(rng, [f"No {name.lower()}.", f"There is no evidence of {name.lower()}."])


# Report sections in CT-RATE order: (findings covered, normal sentences when none is present)
SECTIONS: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    ((), ("Trachea and both main bronchi are open.", "Trachea, both main bronchi are open.", "The trachea and main bronchi are patent.")),
    (("Cardiomegaly", "Arterial wall calcification", "Coronary artery wall calcification"),
     ("Mediastinal main vascular structures, heart contour and size are normal.",
      "Heart contour and size are normal. Thoracic aorta diameter is normal.")),
    (("Pericardial effusion",), ()),
    (("Hiatal hernia",), ("Thoracic oesophageal calibration is normal.",)),
    (("Lymphadenopathy",), ("No enlarged lymph nodes in prevascular, pre-paratracheal, subcarinal or bilateral hilar-axillary "
                            "pathological dimensions were detected.",)),
    (("Medical material",), ()),
    (("Emphysema", "Lung nodule", "Lung opacity", "Consolidation", "Atelectasis", "Pulmonary fibrotic sequela",
      "Mosaic attenuation pattern", "Interlobular septal thickening", "Bronchiectasis", "Peribronchial thickening"),
     ("When examined in the lung parenchyma window, aeration of both lungs is normal and no nodular or infiltrative lesion is detected.",
      "Both lungs are normally aerated.")),
    (("Pleural effusion",), ("Pleural effusion-thickening was not detected.",)),
    ((), ("Upper abdominal organs included in the sections are normal.",
          "No space-occupying lesion was detected in the liver that entered the cross-sectional area.")),
    ((), ("Bone structures in the study area are natural. Vertebral corpus heights are preserved.", "Bony structures are unremarkable.")),
]


def make_report(rng: np.random.Generator, present: dict[str, int], facts: dict[str, dict[str, Any]], anat: Anatomy | None = None) -> str:
    """CT-RATE-like free text (FINDINGS then IMPRESSION) from the actual lesions.

    Positives get a sentence with location and size; some absent findings get an
    explicit negation (real reports negate selectively, and a model must learn that an
    unmentioned finding is not evidence of its presence).
    """
    try:
        kb = load_knowledge()
    except MedAlignError:
        kb = {}
    sentences: list[str] = []
    if anat is not None and anat.p.get("contrast"):
        sentences.append(pick(rng, ["Examination was performed with intravenous contrast.", "Contrast-enhanced thoracic CT."]))
    for covered, normal in SECTIONS:
        pos = [n for n in covered if present.get(n)]
        neg = [n for n in covered if not present.get(n)]
        if pos:
            for n in pos:
                sentences.append(positive_sentence(rng, n, facts.get(n, {}), kb))
        elif normal and rng.random() < 0.6:
            sentences.append(pick(rng, list(normal)))
        for n in neg:
            if rng.random() < 0.45:
                sentences.append(negation(rng, n, kb))
    return "FINDINGS: " + " ".join(sentences) + " IMPRESSION: " + _impression(rng, present, facts, kb)


def _impression(rng: np.random.Generator, present: dict[str, int], facts: dict[str, dict[str, Any]], kb: dict) -> str:
    """The positives named (with their lobe where they have one) in random order, or a normal line."""
    positives = [n for n in CT_RATE_FINDINGS if present.get(n)]
    if not positives:
        return pick(rng, ["Thoracic CT examination within normal limits.", "No significant abnormality.", "Normal chest CT."])
    items = []
    for n in positives:
        f = facts.get(n, {})
        where = f.get("lobe") or (f.get("nodules", [{}])[0].get("lobe") if "nodules" in f else None)
        items.append(f"{term(rng, kb, n, 1)}{' in the ' + where if where else ''}")
    rng.shuffle(items)
    impression = "; ".join(items)
    return impression[0].upper() + impression[1:] + "."
