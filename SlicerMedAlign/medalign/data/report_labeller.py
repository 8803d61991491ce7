"""Rule-based labelling of free-text chest CT reports (0/1 per finding).

Why rules: labels for evaluation must be reproducible and explainable, and must not
depend on a model trained on the very reports being labelled. The vocabulary comes from
the knowledge base (names, synonyms, report cues), so adding a finding there teaches the
labeller too.

Pipeline per report:

1. normalise (lower case, hyphens and slashes as spaces) and split into sentences;
2. find mentions: longest match of every knowledge term (plural forms included) at word
   boundaries, plus a few finding-specific patterns where reports describe a finding by
   its parts ("heart size increased", "calcified plaques in the coronary arteries");
3. NegEx-style scope: pre-negation triggers ("no", "without", "no evidence of", "free of")
   reach forward to the end of their clause; post-negation triggers ("was not observed",
   "is normal", "ruled out") reach back to its start. Clauses end at sentence ends,
   semicolons, contrastive conjunctions ("but", "however") and after a clause verb
   ("was observed", "is seen"), so "no effusion was seen and atelectasis is present" keeps
   atelectasis positive;
4. uncertainty ("possible", "suspicious for", "cannot be excluded", "?") is detected and,
   by default, counted as positive: on CT-RATE's 800 manually labelled reports that
   policy gives macro F1 0.95 against 0.93 for "uncertain = absent" (radiologists hedge
   mostly about findings they do see); pass ``uncertain_as=0`` to flip it.

A finding is labelled 1 when at least one of its mentions is affirmed.

Conventions of CT-RATE's manual labels that the rules follow (general reading habits,
not per-report fixes; see ``Testing/benchmarks/eval_report_labeler.py``): any described
lymph node counts as lymphadenopathy, even below the size threshold; "fibro-atelectasis"
is a fibrotic sequela, not atelectasis; plaques only in the coronaries, the aortic valve
or the abdominal aorta are not "arterial wall calcification"; a bare "effusion" belongs
to the space named nearest to it (pleural when none is named).
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from medalign.core.atomic import atomic_output
from medalign.core.errors import InputError, MedAlignError
from medalign.data.cohorts import ID_COLUMNS
from medalign.knowledge.findings import CT_RATE_FINDINGS, FindingKnowledge, load_knowledge

# --------------------------------------------------------------------------- text helpers

def normalise(text: str) -> str:
    """Lower case, hyphens/slashes/underscores as spaces, single spaces (used on terms and reports alike)."""
    text = text.lower().replace("\u2019", "'")
    text = re.sub(r"(?<=[a-z])[-/_](?=[a-z])", " ", text)
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    return text


_SENT_SPLIT = re.compile(r'(?<=[.!?])\s+|[\n"]+|\s*;\s*(?=\S)')


def split_sentences(text: str) -> list[str]:
    """Sentences of a normalised report; decimals ("3.5 mm") stay intact."""
    return [s.strip(" .,:") for s in _SENT_SPLIT.split(text) if s and s.strip(" .,:")]


def _plural_pattern(word: str) -> str:
    """Regex for a word and its usual English/Latin plural in radiology reports.

    A term written in the plural ("plaques") also matches its singular.
    """
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith("s") and not word.endswith(("ss", "us", "is", "sis")) and len(word) > 3 or word.endswith("ae") and len(word) > 4:
        word = word[:-1]
    w = re.escape(word)
    if word.endswith("sis"):
        return re.escape(word[:-3]) + r"(?:sis|ses)"
    if word.endswith("um"):
        return re.escape(word[:-2]) + r"(?:um|a)"
    if word.endswith("a") and len(word) > 3:
        return w + r"e?"
    if word.endswith("y") and len(word) > 3 and word[-2] not in "aeiou":
        return re.escape(word[:-1]) + r"(?:y|ies)"
    if word.endswith(("s", "x", "ch", "sh")):
        return w + r"(?:es)?"
    return w + r"s?"


def term_pattern(term: str) -> str:
    """Regex for a knowledge term: spaces match any run of spaces, the last word may be plural."""
    words = normalise(term).split()
    if not words:
        return ""
    if not words[-1].isalpha():
        tail = re.escape(words[-1])
    else:
        tail = _plural_pattern(words[-1])
    return r"\s+".join([re.escape(w) for w in words[:-1]] + [tail])


# --------------------------------------------------------------------------- trigger lexicon
# Words are normalised (no hyphens). Order does not matter: alternations are sorted longest first.

PRE_NEGATION = [
    "no", "not", "without", "neither", "nor", "no evidence of", "no evidence for", "no sign of",
    "no signs of", "no finding of", "no findings of", "no finding suggestive of", "free of",
    "absence of", "absent", "negative for", "ruled out", "resolution of", "resolved",
    "disappeared", "regression of", "no significant", "no pathological", "no obvious", "no apparent",
    "nothing", "none", "there is no", "there are no", "there was no", "there were no",
]

POST_NEGATION = [
    "not observed", "not detected", "not seen", "not identified", "not found", "not noted",
    "not present", "not visualized", "not visualised", "not monitored", "not evident",
    "not demonstrated", "not determined", "not encountered", "not apparent", "not shown",
    "not viewed", "not followed", "not appreciated", "not considered", "ruled out",
    "excluded", "disappeared", "resolved", "regressed", "not enlarged", "not increased",
    "not dilated", "not thickened", "not calcified", "not in pathological", "unlikely",
]

# Organ-is-normal phrases ("heart size is normal") deny only a finding named right before
# them: "the heart dimensions have increased, its contour is natural" stays positive.
POST_NORMAL = [
    "within normal limits", "normal", "natural", "preserved", "unremarkable", "usual",
]

UNCERTAIN = [
    "possible", "possibly", "probable", "probably", "likely", "suspicious", "suspicious for",
    "suspected", "suspicion", "questionable", "equivocal", "may be", "may represent",
    "may be compatible", "might", "could be", "cannot be excluded", "can not be excluded",
    "cannot be ruled out", "could not be excluded", "not excluded", "can not be ruled out",
    "differential diagnosis", "in the differential", "to be differentiated", "?", "vs",
    "versus", "consistent with", "compatible with", "in favor of", "rule out",
]

# A post-negation phrase that actually expresses doubt wins over the negation.
_DOUBT_OVERRIDES = ["cannot be excluded", "can not be excluded", "could not be excluded",
                    "cannot be ruled out", "can not be ruled out", "not excluded",
                    "could not be ruled out", "not ruled out"]

# Clause ends: contrast words, relative/causal links and the verbs that close a
# "X is seen" clause. Negation never crosses these.
TERMINATORS = [
    "but", "however", "although", "though", "whereas", "while", "except", "apart from",
    "other than", "yet", "which", "who", "accompanied by", "secondary to", "due to",
    "in addition", "additionally", "also", "there is", "there are", "there was", "there were",
]
# Observation verbs: "X was observed, and ..." closes the clause about X, so a negation
# before or after it does not reach across.
CLAUSE_VERBS = [
    "observed", "seen", "detected", "noted", "identified", "found", "present", "visualized",
    "visualised", "monitored", "evaluated", "demonstrated", "noticed", "appreciated",
]

# Phrases that contain a knowledge term but mean something else; matched and discarded.
MASKS = [
    "subcutaneous emphysema", "subcutaneous emphysematous", "soft tissue emphysema",
    "emphysema in the subcutaneous", "surgical emphysema", "emphysematous cholecystitis",
    "emphysematous pyelonephritis",
    "hepatic nodule", "thyroid nodule", "nodule in the thyroid", "adrenal nodule", "nodule in the liver",
    "nodule in the adrenal", "nodules in the liver", "nodule in the breast", "breast nodule",
    "renal nodule", "hypodense nodule", "thyroid gland nodule",
    "intrapulmonary lymph node", "intraparenchymal lymph node", "subpleural lymph node",
    "perifissural lymph node", "fissural lymph node", "intramammary lymph node",
    "mass effect", "mass lesion in the liver", "adrenal mass", "renal mass", "hepatic mass",
    "liver mass", "breast mass", "thyroid mass",
    "no pathological contrast", "contrast material", "contrast medium",
    "free fluid", "perihepatic fluid", "perisplenic fluid", "fluid in the abdomen",
]


def _alternation(phrases: Iterable[str]) -> str:
    norm = sorted({normalise(p).strip() for p in phrases if p.strip()}, key=len, reverse=True)
    parts = []
    for p in norm:
        body = r"\s+".join(re.escape(w) for w in p.split())
        parts.append(body if not p[0].isalnum() else r"\b" + body + (r"\b" if p[-1].isalnum() else ""))
    return "|".join(parts)


_PRE = re.compile(_alternation(PRE_NEGATION))
_POST = re.compile(_alternation(POST_NEGATION))
_NORMAL = re.compile(_alternation(POST_NORMAL))
_NEG_WORD = re.compile(r"\b(?:no|not|without)\b")
_UNC = re.compile(_alternation(UNCERTAIN))
_DOUBT = re.compile(_alternation(_DOUBT_OVERRIDES))
_TERM = re.compile(
    r"[,:]?\s*\b(?:" + "|".join(re.escape(t) for t in sorted({normalise(x) for x in TERMINATORS}, key=len, reverse=True)) + r")\b|[;:()]"
)
_VERBS = "|".join(sorted(CLAUSE_VERBS, key=len, reverse=True))
_CLOSED_AFTER_PRE = re.compile(r"\b(?:" + _VERBS + r")\b(?:\s+\S+){0,6}?\s*(?:,|\band\b)")
_CLOSED_BEFORE_POST = re.compile(r"\b(?:" + _VERBS + r")\b\s*(?:,|\band\b)")
_RELATIVE = re.compile(r"[^,]{0,80},\s*(?:which|that|who)\b[^,]*,\s*")


# --------------------------------------------------------------------------- finding-specific patterns
# Reports often describe a finding by an organ and a change rather than by its name.
# Each pattern is matched within one sentence; negation and doubt apply as for terms.

_SPECIFIC: dict[str, list[str]] = {
    "Cardiomegaly": [
        r"\b(?:cardiothoracic|cardio thoracic)\s+(?:ratio|index)\b(?:\s+\S+){0,3}?\s+(?:increased|increase|high|higher)\b",
        r"\bctr\b(?:\s+\S+){0,3}?\s+(?:increased|increase|high|higher)\b",
        r"\bincrease\w*\s+(?:\S+\s+){0,3}?(?:cardiothoracic|ctr|heart size|cardiac size|heart dimensions?)\b",
        r"\b(?:heart|cardiac)\b(?:\s+\w+){0,4}?\s+(?:sizes?|dimensions?|volume|silhouette|contour)\b(?:\s+\w+){0,3}?\s+(?:increased|enlarged|large|larger)\b",
        r"\b(?:increased|enlarged)\s+(?:heart|cardiac)\s+(?:sizes?|dimensions?|volume|silhouette|contours?)\b",
        r"\b(?:heart|cardiac silhouette)\s+(?:is|was|appears?|are)\s+(?:\w+\s+){0,2}(?:enlarged|larger than normal)\b",
        r"\b(?:cardiomegaly|enlarged heart)\b",
    ],
    "Coronary artery wall calcification": [
        r"\b(?:coronar(?:y|ies)|lad|rca|circumflex|left anterior descending)\b(?:\s+\S+){0,8}?\s+"
        r"(?:calcif\w*|calcific|atheroma\w*|atheromatous|atherosclerotic|plaques?)\b",
        r"\b(?:calcif\w*|calcific|atheroma\w*|atheromatous|atherosclerotic|plaques?)\b(?:\s+\S+){0,14}?\s+"
        r"(?:coronar(?:y|ies)|lad|rca|circumflex|left anterior descending)\b",
    ],
    "Arterial wall calcification": [
        r"\b(?:calcif\w*|calcific|atheroma\w*|atheromatous)\b(?:\s+\S+){0,14}?\s+(?:aort\w*|arter\w*|vascular|vessels?|arch|subclavian|carotid|brachiocephalic|iliac)\b",
        r"\b(?:aort\w*|arter\w*|vascular|vessels?|arch|subclavian|carotid|brachiocephalic|iliac)\b(?:\s+\S+){0,8}?\s+(?:calcif\w*|calcific|atheroma\w*|plaques?)\b",
    ],
    # CT-RATE's readers count any affirmed lymph node that a report bothers to describe
    # (size, station, "millimetric" included) as lymphadenopathy; only denied ones are 0.
    "Lymphadenopathy": [
        r"\blymph\s+nodes?\b",
        r"\blaps?\b",
    ],
    "Hiatal hernia": [
        r"\bhiatal\b",
        r"\bhernia\w*\b(?:\s+\S+){0,8}?\s+(?:hiatus|esophagogastric|gastroesophageal|esophageal)\b",
        r"\bsliding\b(?:\s+\S+){0,2}?\s+hernia\w*\b",
    ],
    "Pericardial effusion": [r"\bpericardial\b(?:\s+\S+){0,3}?\s+(?:effusion|fluid)\b"],
    "Pleural effusion": [r"\bpleural\b(?:\s+\S+){0,3}?\s+(?:effusion|fluid)\b"],
    "Interlobular septal thickening": [
        r"\b(?:inter|intra)?(?:lobular\s+)?sept(?:al|a|um)\b(?:\s+\S+){0,2}?\s+(?:thicken\w*|thickness\w*)\b",
        r"\b(?:thicken\w*|prominen\w*)\s+(?:\S+\s+){0,6}?(?:interlob\w*\s+)sept(?:a|al|um)\b",
        r"\bthicken\w*\s+(?:of\s+)?(?:the\s+)?sept(?:a|al|um)\b",
    ],
    "Peribronchial thickening": [
        r"\bperibronch\w*\b(?:\s+\S+){0,3}?\s+(?:thicken\w*|thickness\w*|cuffing)\b",
        r"\b(?:thicken\w*|thickness\w*)\s+(?:of\s+|in\s+)?(?:the\s+)?peribronch\w*\b",
    ],
    "Bronchiectasis": [r"\bbronchiect\w*\b", r"\bdilat\w*\s+(?:of\s+)?(?:the\s+)?bronch\w*\b", r"\bbronch\w*\s+dilat\w*\b"],
    "Emphysema": [r"\bemphysem\w*\b"],
    "Rib fracture": [
        r"\bfractur\w*\b(?:\s+\S+){0,8}?\s+ribs?\b",
        r"\bribs?\b(?:\s+\S+){0,4}?\s+fractur\w*\b",
    ],
    "Atelectasis": [r"\batelecta\w*\b"],
    "Mosaic attenuation pattern": [r"\bmosaic\b"],
}


# Sentence-level context checks for findings whose words also occur elsewhere in the body.
_LUNG_WORDS = re.compile(
    r"\b(?:lungs?|pulmonary|lobes?|lobar|segments?|segmental|lingula\w*|parenchyma\w*|fissur\w*|subpleural|pleural|hemithora\w*|"
    r"apex|apices|apical|bronch\w*|basal|basals|bases|hilar|hilum)\b"
)
_OTHER_ORGANS = re.compile(
    r"\b(?:thyroid|liver|hepatic|hepato\w*|adrenal|spleen|splenic|kidneys?|renal|breasts?|areola|mesenter\w*|pancrea\w*|"
    r"colon|colonic|gallbladder|bladder|stomach|gastric|duoden\w*|bowel|vertebra\w*|schmorl|bone|bones|skin|subcutaneous|"
    r"muscles?|axilla\w*|perirenal|peritone\w*|abdominal|abdomen|mediastinum|mediastinal|pericardi\w*|esophag\w*|oesophag\w*|"
    r"chest wall|scapula|sternum|ribs?)\b"
)
_VESSEL = re.compile(
    r"\b(?:(?:coronary|abdominal|pulmonary)\s+)?(?:aort\w*|arter\w*|vascular|vessels?|arch|subclavian|carotid|brachiocephalic|innominate|iliac)\b"
    r"(?!\s+valve)"
)
_CORONARY = re.compile(r"\b(?:coronar(?:y|ies)|lad|rca|circumflex|left anterior descending)\b")


def _lung_context(sentence: str) -> bool:
    """False when the sentence is about another organ only (thyroid nodule, adrenal thickening...)."""
    return bool(_LUNG_WORDS.search(sentence)) or not _OTHER_ORGANS.search(sentence)


def _systemic_artery_context(sentence: str) -> bool:
    """True when a calcified plaque sentence names a chest artery other than the coronaries.

    CT-RATE's arterial wall label is about the aorta and its branches: plaques only in
    the coronaries, the aortic valve or the abdominal aorta do not count; a plaque with no
    vessel named at all does.
    """
    vessels = [m.group() for m in _VESSEL.finditer(sentence)]
    systemic = [v for v in vessels if not v.startswith(("coronary", "abdominal", "pulmonary"))]
    if systemic:
        # "coronary arteries" alone leaves a bare "arteries" only when no other vessel is named
        if (
            all(v.startswith(("arter",)) for v in systemic)
            and _CORONARY.search(sentence)
            and not re.search(r"\b(?:aort\w*|arch|subclavian|carotid|brachiocephalic|iliac)\b(?!\s+valve)", sentence)
        ):
            return False
        return True
    return not vessels and not _CORONARY.search(sentence) and not re.search(r"\b(?:valve|pleura\w*|pericardi\w*)", sentence)


# Words that name a fluid without its space: the space is read from the same clause.
_SITELESS = {"effusion", "fluid"}
_SITES = [
    (re.compile(r"\bpericardi\w*"), "Pericardial effusion"),
    (re.compile(r"\b(?:pleura\w*|hemithora\w*|thora\w*|lungs?|costophrenic|fissur\w*)\b"), "Pleural effusion"),
    (re.compile(r"\b(?:abdom\w*|perirenal|perinephric|kidneys?|renal|spleen|splenic|liver|hepatic|perihepatic|subcapsular|pelvi\w*|"
                r"joint|bursa|gallbladder|pericholecystic|peritone\w*|mesenter\w*|soft tissue|subcutaneous|mediastin\w*|"
                r"esophag\w*|bronch\w*|trachea\w*|lumen)\b"), ""),
]


def _effusion_site(sentence: str, start: int, end: int) -> set[str]:
    """Which space a bare "effusion" is in: the site word nearest to it in its clause wins;
    with none named, a chest CT's effusion is pleural."""
    lo, hi = _clause_bounds(sentence, start, end)
    best: tuple[int, str] | None = None
    for pattern, finding in _SITES:
        for m in pattern.finditer(sentence, lo, hi):
            dist = start - m.end() if m.end() <= start else m.start() - end
            if best is None or dist < best[0]:
                best = (dist, finding)
    if best is None:
        return {"Pleural effusion"}
    return {best[1]} if best[1] else set()


_CONTEXT = {
    "Lung nodule": _lung_context,
    "Lung opacity": _lung_context,
    "Consolidation": _lung_context,
    "Atelectasis": _lung_context,
    "Pulmonary fibrotic sequela": _lung_context,
    "Arterial wall calcification": _systemic_artery_context,
}


@lru_cache(maxsize=16)
def _compiled_specific() -> dict[str, list[re.Pattern]]:
    return {k: [re.compile(p) for p in v] for k, v in _SPECIFIC.items()}


# --------------------------------------------------------------------------- matcher

@dataclass(frozen=True)
class Mention:
    """One occurrence of a finding in a report sentence, with its assertion status."""

    finding: str
    text: str
    sentence: int
    negated: bool
    uncertain: bool

    @property
    def affirmed(self) -> bool:
        return not self.negated


_WORD = re.compile(r"[a-z0-9]+")


def _singulars(word: str) -> set[str]:
    """Candidate singular forms of a report word, to find terms whose last word is pluralised."""
    out = {word}
    if word.endswith("ies"):
        out.add(word[:-3] + "y")
    if word.endswith("ses"):
        out.add(word[:-3] + "sis")
    if word.endswith("es"):
        out.add(word[:-2])
    if word.endswith("s"):
        out.add(word[:-1])
    if word.endswith("ae"):
        out.add(word[:-1])
    if word.endswith("a"):
        out.add(word[:-1] + "um")
    return out


class _Matcher:
    """Leftmost-longest lookup of every knowledge term (names, synonyms, report cues).

    Terms are indexed by their first word, so each report word costs a dict lookup and a
    few anchored regex matches instead of one scan of a huge alternation.
    """

    def __init__(self, kb: Mapping[str, FindingKnowledge]):
        owners: dict[str, set[str]] = {}
        for item in kb.values():
            for term in (item.name, *item.synonyms, *item.report_cues):
                key = normalise(term).strip()
                if key:
                    owners.setdefault(key, set()).add(item.name)
        for mask in MASKS:
            owners.setdefault(normalise(mask).strip(), set())
        self.owners = owners
        index: dict[str, list[tuple[str, re.Pattern]]] = {}
        for key in sorted(owners, key=len, reverse=True):
            first = key.split()[0]
            index.setdefault(first, []).append((key, re.compile(term_pattern(key) + r"(?![a-z0-9])")))
        self.index = index

    def find(self, sentence: str) -> list[tuple[int, int, set[str], str]]:
        out = []
        pos = 0
        for w in _WORD.finditer(sentence):
            if w.start() < pos:
                continue
            cands: list[tuple[str, re.Pattern]] = []
            for form in _singulars(w.group()):
                cands.extend(self.index.get(form, ()))
            if not cands:
                continue
            cands.sort(key=lambda kp: len(kp[0]), reverse=True)
            best = None
            for key, pat in cands:
                m = pat.match(sentence, w.start())
                if m and (best is None or m.end() > best[1]):
                    best = (m.start(), m.end(), self.owners[key], key)
            if best:
                out.append(best)
                pos = best[1]
        return out


def _kb_key(kb: Mapping[str, FindingKnowledge]) -> tuple:
    return tuple((k.name, k.synonyms, k.report_cues) for k in kb.values())


_MATCHERS: dict[tuple, _Matcher] = {}


def _matcher(kb: Mapping[str, FindingKnowledge]) -> _Matcher:
    key = _kb_key(kb)
    m = _MATCHERS.get(key)
    if m is None:
        if len(_MATCHERS) > 8:
            _MATCHERS.clear()
        m = _MATCHERS[key] = _Matcher(kb)
    return m


# --------------------------------------------------------------------------- scope

def _clause_bounds(sentence: str, start: int, end: int) -> tuple[int, int]:
    """Start and end of the clause around [start, end): cut at terminators."""
    lo, hi = 0, len(sentence)
    for m in _TERM.finditer(sentence):
        if m.end() <= start:
            lo = max(lo, m.end())
        elif m.start() >= end:
            hi = min(hi, m.start())
            break
    return lo, hi


def _status(sentence: str, start: int, end: int) -> tuple[bool, bool]:
    """(negated, uncertain) for the mention at [start, end) of a sentence."""
    lo, hi = _clause_bounds(sentence, start, end)
    before, after = sentence[lo:start], sentence[end:hi]
    inside = sentence[start:end]
    # A long pattern may swallow its own negation ("lymph nodes were not observed in pathological size").
    negated = bool(_NEG_WORD.search(inside))
    # Pre-negation: trigger before the mention, no clause verb closing its clause in between
    # (so "no effusion was seen and atelectasis" does not negate atelectasis).
    for m in _PRE.finditer(before):
        if not _CLOSED_AFTER_PRE.search(before[m.end():]):
            negated = True
    # Post-negation: trigger after the mention within the clause, before another clause verb + "and".
    pm = _POST.search(after)
    if pm and not _CLOSED_BEFORE_POST.search(after[: pm.start()]):
        negated = True
    # "X, which was seen before, was not detected now": skip the relative clause.
    rel = _RELATIVE.match(sentence, end)
    if rel and not negated:
        rest_lo = rel.end()
        _, rest_hi = _clause_bounds(sentence, rest_lo, rest_lo)
        pm = _POST.search(sentence, rest_lo, rest_hi)
        if pm and len(sentence[rest_lo:pm.start()].split()) <= 3:
            negated = True
    nm = _NORMAL.search(after)
    if nm:
        gap = after[: nm.start()]
        if "," not in gap and len(gap.split()) <= 4 and not re.search(r"\bthan\s*$", gap):
            negated = True
    doubt = bool(_DOUBT.search(after) or _DOUBT.search(before))
    uncertain = bool(_UNC.search(before) or _UNC.search(after)) or doubt
    if doubt:
        negated = False
    return negated, uncertain


def find_mentions(
    text: str,
    findings: Sequence[str] | None = None,
    kb: Mapping[str, FindingKnowledge] | None = None,
) -> list[Mention]:
    """Every mention of the requested findings (all known ones when None), in report order."""
    kb = load_knowledge() if kb is None else kb
    wanted = set(findings) if findings is not None else set(kb)
    matcher = _matcher(kb)
    specific = _compiled_specific()
    mentions: list[Mention] = []
    for si, sentence in enumerate(split_sentences(normalise(text))):
        term_spans = []
        for start, end, owners, key in matcher.find(sentence):
            if key in _SITELESS:
                owners = _effusion_site(sentence, start, end)
            term_spans.append((start, end, owners))
        spans: list[tuple[int, int, set[str]]] = list(term_spans)
        for name, patterns in specific.items():
            if name not in wanted:
                continue
            for pat in patterns:
                for m in pat.finditer(sentence):
                    # Longest match wins here too: a hit inside a term owned by other findings
                    # ("subcutaneous emphysema", "fibro-atelectasis") is not this finding.
                    if any(name not in owners and s <= m.start() and m.end() <= e for s, e, owners in term_spans):
                        continue
                    # ...and a term that already names this finding there needs no second mention.
                    if any(name in owners and s < m.end() and m.start() < e for s, e, owners in spans):
                        continue
                    spans.append((m.start(), m.end(), {name}))
        for start, end, owners in spans:
            hits = {h for h in owners & wanted if h not in _CONTEXT or _CONTEXT[h](sentence)}
            if not hits:
                continue
            negated, uncertain = _status(sentence, start, end)
            for name in sorted(hits):
                mentions.append(Mention(name, sentence[start:end], si, negated, uncertain))
    return mentions


def label_report(
    text: str,
    findings: Sequence[str] = CT_RATE_FINDINGS,
    kb: Mapping[str, FindingKnowledge] | None = None,
    uncertain_as: int = 1,
) -> dict[str, int]:
    """0/1 label per finding: 1 when the report affirms it at least once.

    ``uncertain_as`` decides hedged mentions ("possible", "cannot be excluded"): 1 (the
    default, best agreement with CT-RATE's manual labels) or 0.
    """
    kb = load_knowledge() if kb is None else kb
    unknown = [f for f in findings if f not in kb]
    if unknown:
        raise MedAlignError(f"The knowledge base has no finding named {unknown[0]!r}, so it cannot be labelled.")
    labels = {f: 0 for f in findings}
    for m in find_mentions(text or "", findings, kb):
        if m.negated:
            continue
        if m.uncertain and not uncertain_as:
            continue
        labels[m.finding] = 1
    return labels


def label_reports_csv(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    text_column: str = "report_text",
    id_column: str | None = None,
    findings: Sequence[str] = CT_RATE_FINDINGS,
) -> Path:
    """Label every report of a CSV; writes ``id column + one 0/1 column per finding`` atomically.

    Without ``id_column`` the first of ``ID_COLUMNS`` the file has is kept, so the output
    of a cohort's reports.csv is a labels.csv that ``medalign eval`` and training read."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise InputError(f"Reports file {src} does not exist.")
    try:
        with src.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            if text_column not in columns:
                raise InputError(f"Reports file {src.name} has no column {text_column!r} (columns: {', '.join(columns) or 'none'}).")
            if id_column is not None and id_column not in columns:
                raise InputError(f"Reports file {src.name} has no id column {id_column!r} (columns: {', '.join(columns)}).")
            if id_column is None:  # keep the case id a cohort's labels.csv is matched by
                id_column = next((c for c in ID_COLUMNS if c in columns), None)
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise InputError(f"Reports file {src.name} is not UTF-8 text.") from exc
    except csv.Error as exc:
        raise InputError(f"Reports file {src.name} is not a readable CSV ({exc}).") from exc
    kb = load_knowledge()
    header = ([id_column] if id_column else []) + list(findings)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(dst) as tmp, open(tmp, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        for row in rows:
            labels = label_report(row.get(text_column) or "", findings, kb)
            writer.writerow(([row.get(id_column, "")] if id_column else []) + [labels[f] for f in findings])
    return dst


__all__ = ["Mention", "find_mentions", "label_report", "label_reports_csv", "normalise", "split_sentences", "term_pattern"]
