"""Model specs: every built-in model described as data (``resources/models/<name>/model.json``).

A spec says where a model's weights and text encoder come from (shipped in the package,
a pinned Hub repository, or supplied by the user), which family builds it, and what a
user needs to choose it: licence, size, training data, citation, the findings it was
validated on and its card. Adding a published model is a new folder with a spec and a
card, not new code paths; calibration is fitted later and lives on the model
(``models.calibration``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from medalign.core.errors import CheckpointError
from medalign.core.resources import resources_dir

SPEC_FILE = "model.json"
SPEC_VERSION = 1
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SOURCES = ("bundled", "hub", "user", "package")


@dataclass(frozen=True)
class HubFiles:
    """Files of one Hugging Face Hub repository at one revision.

    ``revision`` is a commit hash when the publisher's is known; a branch name ("main")
    is resolved on first download and the commit and hashes are then pinned locally.
    ``sha256`` maps a file to its expected hash where known (LFS files).
    """

    repo_id: str
    files: tuple[str, ...]
    revision: str = "main"
    sha256: dict[str, str] = field(default_factory=dict)
    gated: bool = False
    repo_type: str = "model"  # "model" or "dataset" (CT-CLIP's weights sit in the CT-RATE dataset)

    @property
    def pinned(self) -> bool:
        return bool(re.fullmatch(r"[0-9a-f]{40}", self.revision))


@dataclass(frozen=True)
class Source:
    """Where one part of a model (weights or text encoder) comes from.

    ``bundled``: ``path`` inside the model's resource folder; ``package``: a Python
    package that ships it (``path`` names the package); ``hub``: ``hub``; ``user``: the
    user registers it (``how`` says how to obtain it).
    """

    kind: str
    path: str | None = None
    hub: HubFiles | None = None
    how: str = ""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    title: str
    description: str
    weights: Source
    text_encoder: Source
    profile: str
    findings: str  # a finding group ("ct-rate", "abdominal", …) screened when none are asked for
    licence: str
    size_bytes: int | None
    trained_on: str
    citation: str
    card: str | None
    folder: Path
    research_only: bool = True

    @property
    def card_path(self) -> Path | None:
        path = self.folder / self.card if self.card else None
        return path if path is not None and path.is_file() else None


def _bad(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"The model spec {path} is invalid: {why}; reinstall medalign.")


def _hub(raw: dict, where: Path) -> HubFiles:
    files = raw.get("files") or ([raw["filename"]] if raw.get("filename") else [])
    if not raw.get("repo_id") or not files:
        raise _bad(where, "a Hub source needs 'repo_id' and 'files'")
    sha = {str(k): str(v).lower() for k, v in (raw.get("sha256") or {}).items()}
    if any(not _SHA256_RE.match(v) for v in sha.values()):
        raise _bad(where, "a 'sha256' entry is not 64 hexadecimal characters")
    repo_type = str(raw.get("repo_type") or "model")
    if repo_type not in ("model", "dataset"):
        raise _bad(where, f"repo_type '{repo_type}' is not 'model' or 'dataset'")
    revision = str(raw.get("revision") or "main")
    return HubFiles(str(raw["repo_id"]), tuple(map(str, files)), revision, sha, bool(raw.get("gated")), repo_type)


def _source(raw: dict | None, where: Path) -> Source:
    raw = raw or {"source": "user"}
    kind = raw.get("source")
    if kind not in _SOURCES:
        raise _bad(where, f"source '{kind}' is not one of {', '.join(_SOURCES)}")
    hub = _hub(raw, where) if kind == "hub" else None
    return Source(kind, raw.get("path"), hub, str(raw.get("how", "")))


def read_spec(path: Path) -> ModelSpec:
    """One spec file; a malformed one is a single sentence naming it."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _bad(path, f"it is not readable JSON ({exc})") from None
    if raw.get("spec_version") != SPEC_VERSION:
        raise _bad(path, f"spec_version {raw.get('spec_version')!r} is not {SPEC_VERSION}")
    missing = [k for k in ("name", "family", "profile", "licence") if not raw.get(k)]
    if missing:
        raise _bad(path, f"missing {', '.join(missing)}")
    return ModelSpec(
        name=str(raw["name"]),
        family=str(raw["family"]),
        title=str(raw.get("title") or raw["name"]),
        description=str(raw.get("description", "")),
        weights=_source(raw.get("weights"), path),
        text_encoder=_source(raw.get("text_encoder"), path),
        profile=str(raw["profile"]),
        findings=str(raw.get("findings") or "ct-rate"),
        licence=str(raw["licence"]),
        size_bytes=int(raw["size_bytes"]) if raw.get("size_bytes") else None,
        trained_on=str(raw.get("trained_on", "")),
        citation=str(raw.get("citation", "")),
        card=raw.get("card"),
        folder=path.parent,
        research_only=bool(raw.get("research_only", True)),
    )


def builtin_specs(folder: Path | None = None) -> dict[str, ModelSpec]:
    """Every spec shipped in the package (``folder``: its ``resources/models``), the
    embedded demo first, then by name."""
    folder = folder if folder is not None else resources_dir() / "models"
    specs = [read_spec(p) for p in sorted(folder.glob(f"*/{SPEC_FILE}"))]
    specs.sort(key=lambda s: (s.weights.kind != "bundled", s.name))
    return {s.name: s for s in specs}


__all__ = ["HubFiles", "ModelSpec", "SPEC_FILE", "Source", "builtin_specs", "read_spec"]
