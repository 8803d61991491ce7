"""The model list both front ends show: one label per model, and whether choosing it
means a download first.

The Slicer panel's model selector and the web viewer's model select show the same
labels ("COLIPRI — MIT · 1.2 GB · not downloaded") and ask the same question before a
download, so the words and the rule live here, read from the registry
(``registry.entry_as_dict``: cheap, no hashing, no network) every time the list is shown:
a download finished by another process (``medalign models download``) shows up too.
"""

from __future__ import annotations

from dataclasses import dataclass

from medalign.core.errors import CheckpointError

# registry.weights_status words -> what a person reads in the list
STATUS_WORDS = {
    "local": "ready",
    "downloaded": "downloaded",
    "not downloaded": "not downloaded",
    "unset": "weights not registered",
    "missing": "weights missing",
}


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model selector."""

    name: str
    title: str
    label: str
    licence: str
    size_bytes: int | None
    status: str  # registry.weights_status: local, downloaded, not downloaded, unset, missing
    source: str  # bundled, hub, user
    trained_on: str
    description: str

    @property
    def needs_download(self) -> bool:
        """True when screening with it would first fetch its weights (ask before that)."""
        return self.status == "not downloaded"


def format_size(size_bytes: int | None) -> str:
    """"1.2 GB", "3 MB", or "" when the size is unknown."""
    if not size_bytes:
        return ""
    return f"{size_bytes / 1e9:.1f} GB" if size_bytes >= 1e9 else f"{max(1, round(size_bytes / 1e6))} MB"


def _choice(data: dict) -> ModelChoice:
    status = str(data["status"])
    parts = [str(data["licence"]), format_size(data.get("size_bytes")), STATUS_WORDS.get(status, status)]
    label = f"{data['title']} — " + " · ".join(p for p in parts if p)
    return ModelChoice(name=data["name"], title=data["title"], label=label, licence=data["licence"],
                       size_bytes=data.get("size_bytes"), status=status, source=data["source"],
                       trained_on=data.get("trained_on") or "", description=data.get("description") or "")


def model_choices() -> list[ModelChoice]:
    """Every known model (built-ins first, then the user's), as the selectors list them."""
    from medalign.models import registry

    return [_choice(registry.entry_as_dict(entry)) for entry in registry.list_models()]


def model_choice(name: str) -> ModelChoice:
    """The choice called ``name``; an unknown name is the registry's one sentence."""
    from medalign.models import registry

    return _choice(registry.entry_as_dict(registry.get(name)))


def needs_download(name: str | None) -> bool:
    """True when model ``name`` must be downloaded before it can screen. False for an
    unknown name: the screening child then says what is wrong in its own sentence."""
    if not name:
        return False
    try:
        return model_choice(name).needs_download
    except CheckpointError:
        return False


def download_question(choice: ModelChoice) -> str:
    """The one question asked before a download (the panel's dialog, the web viewer's)."""
    facts = ", ".join(p for p in (choice.licence, format_size(choice.size_bytes)) if p)
    where = "the Hugging Face Hub" if choice.source == "hub" else "its registered address"
    return (f"Model {choice.title} ({facts}) is not downloaded yet. Download it now from {where}? "
            "It runs in the background, is checked against its SHA-256, and a cancelled download resumes later.")


__all__ = ["STATUS_WORDS", "ModelChoice", "download_question", "format_size", "model_choice", "model_choices",
           "needs_download"]
