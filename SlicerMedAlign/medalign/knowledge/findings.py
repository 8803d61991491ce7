"""Finding knowledge base and prompt building.

Each finding has a readable YAML file in ``resources/knowledge`` (name, synonyms,
definition, CT appearance, typical anatomy, how reports negate it, extra report cues).
The same text serves three consumers, which is why it lives in one place:

* prompt ensembling for zero-shot scoring (``build_prompts``),
* the knowledge bank of the BrgSA-style model (definitions and symptoms),
* the rule-based report labeller (``medalign.data.report_labeller``: synonyms, cues, negations).

Free-text findings that the knowledge base does not know still work: they get the
model family's templates alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from medalign.core.errors import MedAlignError
from medalign.core.resources import resources_dir

CT_RATE_FINDINGS: list[str] = [
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
]

CT_RATE_LT_FINDINGS: list[str] = [
    "Pneumonia",
    "Pneumothorax",
    "Empyema",
    "Tuberculosis",
    "Pulmonary fibrosis",
    "Lung cyst",
    "Bronchial thickening",
    "Lung mass",
    "Osteophyte",
    "Rib fracture",
    "Atherosclerosis",
    "Pericardial calcification",
    "Spondylosis",
    "Pleural calcification",
    "Pneumomediastinum",
]

# Abdominal CT findings for abdominal models (Merlin's default list): the common acute and
# incidental findings of abdominal/pelvic CT reports, chosen for this project; merlin-vlm
# itself ships no zero-shot finding list (see resources/models/merlin/MODEL_CARD.md).
ABDOMINAL_FINDINGS: list[str] = [
    "Ascites",
    "Hepatomegaly",
    "Splenomegaly",
    "Hepatic steatosis",
    "Liver lesion",
    "Gallstones",
    "Biliary ductal dilation",
    "Pancreatitis",
    "Hydronephrosis",
    "Renal cyst",
    "Renal stone",
    "Adrenal nodule",
    "Bowel obstruction",
    "Bowel wall thickening",
    "Appendicitis",
    "Diverticulitis",
    "Pneumoperitoneum",
    "Abdominal aortic aneurysm",
    "Abdominal wall hernia",
    "Prostatomegaly",
]

GROUPS = ("ct-rate", "ct-rate-lt", "abdominal")
SYMPTOM_KEYS = ("density", "shape", "location")
_REQUIRED = ("name", "group", "synonyms", "definition", "symptoms", "anatomy", "negations", "report_cues")

# How many synonyms join the finding name in a prompt ensemble. The YAML files list the
# most canonical synonyms first; the rest are report spellings (abbreviations, plural
# or adjectival forms) that help the labeller but make clumsy prompts.
PROMPT_SYNONYMS = 3


def slugify(name: str) -> str:
    """File-system and identifier safe key of a finding name ("Lung nodule" -> "lung_nodule")."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")
    return slug


FINDING_GROUPS: dict[str, list[str]] = {
    "ct-rate": CT_RATE_FINDINGS,
    "ct-rate-lt": CT_RATE_LT_FINDINGS,
    "all": CT_RATE_FINDINGS + CT_RATE_LT_FINDINGS,  # the chest lists, as before the abdominal set
    "abdominal": ABDOMINAL_FINDINGS,
}


# A finding is a name or a short description; longer text is a pasted report, and it
# ends up in prompts, table cells and map file names.
MAX_FINDING_CHARS = 200


def parse_findings(text: str | Sequence[str] | None, separators: str = ";") -> list[str]:
    """"A;B" or a list -> clean, de-duplicated names; None/"" -> the 18 CT-RATE findings.

    The one parser of every command's --findings. The words "ct-rate", "ct-rate-lt", "all"
    (both chest lists) and "abdominal" expand to those finding lists. ``separators`` other than ";" exist only for
    ``label-reports``, which took "A,B" before and still does. A finding longer than
    ``MAX_FINDING_CHARS`` is refused in one sentence.
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        return list(CT_RATE_FINDINGS)
    items = re.split("[" + re.escape(separators) + "]", text) if isinstance(text, str) else list(text)
    out: list[str] = []
    for item in (s.strip() for s in items):
        expand = FINDING_GROUPS.get(item.lower(), [item] if item else [])
        out += [n for n in expand if n.lower() not in {o.lower() for o in out}]
    from medalign.core.errors import InputError

    if not out:
        raise InputError("No finding names were given.")
    for name in out:
        if len(name) > MAX_FINDING_CHARS:
            raise InputError(
                f"The finding \"{' '.join(name[:40].split())}...\" is {len(name)} characters long; describe a finding "
                f"in at most {MAX_FINDING_CHARS} characters (a prompt encoder reads only the first few dozen words)."
            )
    return out


def _norm(text: str) -> str:
    return " ".join(text.strip().lower().split())


@dataclass(frozen=True)
class FindingKnowledge:
    """What the project knows about one finding, as read from its YAML file."""

    name: str
    group: str
    synonyms: tuple[str, ...]
    definition: str
    symptoms: dict = field(hash=False, compare=True)
    anatomy: tuple[str, ...]
    negations: tuple[str, ...]
    report_cues: tuple[str, ...]

    @property
    def slug(self) -> str:
        return slugify(self.name)

    def describe(self) -> str:
        """One paragraph (definition + CT appearance) used by reports and the knowledge bank."""
        parts = [self.definition.strip()]
        look = "; ".join(f"{k}: {self.symptoms[k]}" for k in SYMPTOM_KEYS if self.symptoms.get(k))
        if look:
            parts.append(f"On CT ({look}).")
        return " ".join(parts)


def knowledge_dir() -> Path:
    """The packaged ``resources/knowledge`` folder (one YAML per finding)."""
    return resources_dir() / "knowledge"


def _string_list(data: Mapping[str, Any], key: str, path: Path, allow_empty: bool = False) -> tuple[str, ...]:
    value = data[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise MedAlignError(f"Knowledge file {path.name}: field '{key}' must be a list of non-empty strings.")
    if not value and not allow_empty:
        raise MedAlignError(f"Knowledge file {path.name}: field '{key}' must not be empty.")
    return tuple(v.strip() for v in value)


def _parse(path: Path) -> FindingKnowledge:
    import yaml  # lazy: the Slicer panel lists findings before dependencies are installed

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise MedAlignError(f"Knowledge file {path.name} cannot be read as YAML ({type(exc).__name__}).") from exc
    if not isinstance(data, dict):
        raise MedAlignError(f"Knowledge file {path.name} must hold a mapping of fields, not {type(data).__name__}.")
    missing = [k for k in _REQUIRED if k not in data or data[k] is None]
    if missing:
        raise MedAlignError(f"Knowledge file {path.name} is missing the field '{missing[0]}'.")
    name, group, definition = data["name"], data["group"], data["definition"]
    if not isinstance(name, str) or not name.strip():
        raise MedAlignError(f"Knowledge file {path.name}: field 'name' must be a non-empty string.")
    if group not in GROUPS:
        raise MedAlignError(f"Knowledge file {path.name}: field 'group' must be one of {', '.join(GROUPS)}, not {group!r}.")
    if not isinstance(definition, str) or not definition.strip():
        raise MedAlignError(f"Knowledge file {path.name}: field 'definition' must be a non-empty string.")
    symptoms = data["symptoms"]
    if not isinstance(symptoms, dict):
        raise MedAlignError(f"Knowledge file {path.name}: field 'symptoms' must map density, shape and location to text.")
    for key in SYMPTOM_KEYS:
        if not isinstance(symptoms.get(key), str) or not symptoms[key].strip():
            raise MedAlignError(f"Knowledge file {path.name} is missing the field 'symptoms.{key}'.")
    # A negation is a template with ``{finding}`` ("No {finding}.") or a complete sentence
    # that denies the finding in organ terms ("Heart size is normal."); at least one must
    # be a template so free wording of the finding name can be negated.
    negations = _string_list(data, "negations", path)
    if not any("{finding}" in t for t in negations):
        raise MedAlignError(f"Knowledge file {path.name}: no negation uses the '{{finding}}' placeholder.")
    for template in negations:
        if re.search(r"\{(?!finding\})", template):
            raise MedAlignError(f"Knowledge file {path.name}: negation {template!r} has a placeholder other than '{{finding}}'.")
    if path.stem != slugify(name):
        raise MedAlignError(f"Knowledge file {path.name} must be named {slugify(name)}.yaml after its finding name.")
    return FindingKnowledge(
        name=name.strip(),
        group=group,
        synonyms=_string_list(data, "synonyms", path),
        definition=" ".join(definition.split()),
        symptoms={k: " ".join(str(v).split()) for k, v in symptoms.items()},
        anatomy=_string_list(data, "anatomy", path),
        negations=negations,
        report_cues=_string_list(data, "report_cues", path, allow_empty=True),
    )


@lru_cache(maxsize=8)
def _load_cached(directory: str) -> dict[str, FindingKnowledge]:
    folder = Path(directory)
    if not folder.is_dir():
        raise MedAlignError(f"Knowledge folder {folder} does not exist.")
    kb: dict[str, FindingKnowledge] = {}
    seen: dict[str, str] = {}
    for path in sorted(folder.glob("*.yaml")):
        item = _parse(path)
        if item.name in kb:
            raise MedAlignError(f"Knowledge file {path.name} repeats the finding name {item.name!r}.")
        for term in (item.name, *item.synonyms):
            key = _norm(term)
            owner = seen.get(key)
            if owner is not None and owner != item.name:
                raise MedAlignError(
                    f"Knowledge file {path.name}: synonym {term!r} is already used by {owner!r}, so lookups would be ambiguous."
                )
            seen[key] = item.name
        kb[item.name] = item
    if not kb:
        raise MedAlignError(f"Knowledge folder {folder} holds no *.yaml finding files.")
    return kb


def load_knowledge(directory: Path | None = None) -> dict[str, FindingKnowledge]:
    """All findings of a knowledge folder keyed by name (cached; every file is validated).

    The packaged folder is the default; a user folder lets a site add its own findings.
    The returned dict is a fresh copy so callers cannot corrupt the cache.
    """
    folder = Path(directory) if directory is not None else knowledge_dir()
    return dict(_load_cached(str(folder.resolve())))


def find(name: str, kb: Mapping[str, FindingKnowledge] | None = None) -> FindingKnowledge | None:
    """The finding whose name, slug or synonym equals ``name`` (case-insensitive), else None."""
    kb = load_knowledge() if kb is None else kb
    key = _norm(name)
    if not key:
        return None
    for item in kb.values():
        if _norm(item.name) == key or item.slug == slugify(name):
            return item
    for item in kb.values():
        if any(_norm(s) == key for s in item.synonyms):
            return item
    return None


@dataclass
class PromptSet:
    """Positive and negative sentences for one finding; index 0 is the model family's exact wording."""

    finding: str
    positive: list[str]
    negative: list[str]


def _grammar_fill(template: str, term: str) -> str:
    """Fill ``{finding}``: capitalise at sentence start, lower-case mid-sentence (acronyms kept)."""
    at_start = template.lstrip().startswith("{finding}")
    if at_start:
        text = term[:1].upper() + term[1:]
    else:
        words = term.split()
        text = " ".join(w if (w.isupper() and len(w) > 1) else w.lower() for w in words)
    return template.replace("{finding}", text)


def build_prompts(
    finding: str,
    templates: Mapping[str, list[str]],
    kb: Mapping[str, FindingKnowledge] | None = None,
    use_knowledge: bool = True,
    max_per_side: int = 8,
) -> PromptSet:
    """Prompt ensemble for ``finding`` from the family ``templates`` plus its knowledge.

    Order (deterministic, duplicates dropped, at most ``max_per_side``): every template
    filled with the finding name exactly as given (so index 0 is the family's own wording,
    which parity with the reference code needs), then the templates filled with the main
    synonyms (so positive[i] and negative[i] stay mirror sentences), then, on the negative
    side only, the knowledge's own negation phrasings. Unknown findings use templates alone.
    """
    if max_per_side < 1:
        raise MedAlignError("max_per_side must be at least 1 prompt.")
    name = " ".join(str(finding).split())
    if not name:
        raise MedAlignError("A finding name must not be empty.")
    pos_t = list(templates.get("positive") or [])
    neg_t = list(templates.get("negative") or [])
    if not pos_t or not neg_t:
        raise MedAlignError("Prompt templates need at least one 'positive' and one 'negative' sentence.")
    for t in (*pos_t, *neg_t):
        if "{finding}" not in t:
            raise MedAlignError(f"Prompt template {t!r} lacks the '{{finding}}' placeholder.")

    info = find(name, kb) if use_knowledge else None
    synonyms: list[str] = []
    if info is not None:
        for term in (info.name, *info.synonyms):
            if _norm(term) != _norm(name) and _norm(term) not in {_norm(s) for s in synonyms}:
                synonyms.append(term)
        synonyms = synonyms[:PROMPT_SYNONYMS]

    def assemble(family: list[str], extra: tuple[str, ...]) -> list[str]:
        out: list[str] = []
        seen: set[str] = set()

        def add(text: str) -> None:
            key = _norm(text)
            if key not in seen and len(out) < max_per_side:
                seen.add(key)
                out.append(text)

        for t in family:
            add(t.replace("{finding}", name))
        for term in synonyms:
            for t in family:
                add(_grammar_fill(t, term))
        for t in extra:
            add(_grammar_fill(t, info.name if info is not None else name))
        return out

    negations = info.negations if info is not None else ()
    return PromptSet(finding=name, positive=assemble(pos_t, ()), negative=assemble(neg_t, negations))


__all__ = [
    "ABDOMINAL_FINDINGS",
    "FINDING_GROUPS",
    "parse_findings",
    "CT_RATE_FINDINGS",
    "CT_RATE_LT_FINDINGS",
    "FindingKnowledge",
    "PromptSet",
    "build_prompts",
    "find",
    "knowledge_dir",
    "load_knowledge",
    "slugify",
]
