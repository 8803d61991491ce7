"""Training wording: the finding prompts the loop scores images against, and report
sentences, kept apart from the inference templates so evaluation measures unseen wordings."""

from __future__ import annotations

import re

# Training wording: disjoint from the inference templates (models.medalign_model.PROMPT_TEMPLATES)
# and from the knowledge base's negation templates, so evaluation measures unseen wordings.
TRAIN_TEMPLATES = {
    "positive": [
        "{finding}.",
        "{finding} is noted.",
        "{finding} is observed.",
        "Presence of {finding}.",
        "The scan shows {finding}.",
        "{finding} was detected.",
        "Evidence of {finding}.",
        "Compatible with {finding}.",
    ],
    "negative": [
        "No {finding}.",
        "{finding} is absent.",
        "Without {finding}.",
        "{finding} was not detected.",
        "The scan shows no {finding}.",
        "Absence of {finding}.",
        "Negative for {finding}.",
        "Free of {finding}.",
    ],
}


def finding_sentences(finding: str, kb=None) -> tuple[list[str], list[str]]:
    """Training positives/negatives: TRAIN_TEMPLATES filled with the name and its synonyms."""
    from medalign.knowledge.findings import find

    k = find(finding, kb)
    names = [finding] + ([s for s in k.synonyms[:4]] if k is not None else [])
    def fill(tpl: str, name: str) -> str:
        text = tpl.format(finding=name if tpl.startswith("{") else name.lower())
        return text[0].upper() + text[1:]
    pos = [fill(t, n) for n in names for t in TRAIN_TEMPLATES["positive"]]
    neg = [fill(t, n) for n in names for t in TRAIN_TEMPLATES["negative"]]
    return pos, neg


def report_sentences(report: str) -> list[str]:
    """A report split into its sentences (each is embedded, then averaged)."""
    parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", report or "") if len(s.strip()) > 3]
    return parts or [report or ""]
