"""Few-shot adapters: the file format, and how screening applies one.

An adapter is what ``medalign adapt`` learns on a handful of labelled scans: per adapted
finding, a present and an absent class embedding in the model's joint image-text space.
Encoders stay frozen, so screening with an adapter only swaps each adapted finding's
ensembled prompt latents (``PromptLatents.ensemble``) for the adapter's class embeddings;
scores and maps (``token_logits`` with the same latents) then follow for every family.

The learning lives in ``medalign.training.adapt`` (inference never imports training);
this module holds only what screening needs: reading, checking and applying.

File: safetensors (tensors only, never pickle) with the JSON metadata in the header
under ``medalign_adapter``: format version, the model's name and weights SHA-256,
family, method, shots, findings, training data and an optional calibration block
(``Calibration.to_dict()``). An adapter belongs to one set of weights: a file made for
another model is refused in one sentence naming both.

Torch loads only when tensors are read or written: ``read_adapter_header`` (what the panel
and the web viewer show about a file, and the model check) reads the header alone.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from medalign.core.errors import CheckpointError
from medalign.models.calibration import Calibration

if TYPE_CHECKING:
    import torch

    from medalign.inference.screener import PromptLatents
    from medalign.models.base import ScreeningModel

FORMAT = "medalign-adapter"
FORMAT_VERSION = 1
METADATA_KEY = "medalign_adapter"
CLASS_LATENTS = "class_latents"  # (F, 2, D): present, absent class embedding per finding
METHODS = ("vip", "kmat", "vip+kmat")
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


@dataclass
class Adapter:
    """Adapted class embeddings of some findings for one model (identified by its weights).

    ``tensors`` always holds ``class_latents`` (F, 2, D); the learned parameters
    (``context``, ``merge_query``) travel along for inspection but screening reads only
    the class latents. ``registered``: ``model`` is a registry name (so ``medalign
    screen --adapter`` can load the model by itself).
    """

    model: str
    model_sha256: str
    family: str
    method: str
    shots: int
    findings: list[str]
    tensors: dict[str, torch.Tensor]
    data: str = ""
    registered: bool = False
    calibration: Calibration | None = None
    info: dict = field(default_factory=dict)

    @property
    def class_latents(self) -> torch.Tensor:
        return self.tensors[CLASS_LATENTS]

    def metadata(self) -> dict:
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "model": self.model, "model_sha256": self.model_sha256,
            "registered": self.registered, "family": self.family, "method": self.method, "shots": self.shots,
            "findings": list(self.findings), "data": self.data,
            "calibration": None if self.calibration is None else self.calibration.to_dict(), "info": self.info,
        }


def model_fingerprint(model: ScreeningModel, registry_name: str | None) -> tuple[str, str, bool]:
    """(name, weights SHA-256, registered) that an adapter is tied to.

    A registry model is its name and the SHA-256 the registry pins for its weights file; any
    other model object is identified by a digest of its tensors (the text cache's), so an
    adapter never meets weights it was not trained on, whatever the name says.
    """
    from medalign.inference.text_cache import state_digest

    if registry_name is not None:
        from medalign.models import registry

        try:
            entry = registry.get(registry_name)
        except CheckpointError:
            entry = None
        if entry is not None and entry.sha256:
            return entry.name, entry.sha256, True
    return registry_name or getattr(model, "name", model.family), state_digest(model), False


def save_adapter(adapter: Adapter, path: str | Path) -> Path:
    """Write ``adapter`` atomically (a temporary name, then renamed)."""
    import torch
    from safetensors.torch import save_file

    from medalign.core.atomic import atomic_output

    check_shapes(adapter, Path(path))
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter.tensors.items()}
    with atomic_output(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(adapter.metadata(), sort_keys=True)})
    return Path(path)


def read_adapter(path: str | Path) -> Adapter:
    """The adapter in ``path``; a missing, corrupt or foreign file is one sentence."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"The adapter file {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 -- safe_open has no __iter__
    except Exception as exc:  # safetensors raises its own error types (and OSError, ValueError) for bad files
        raise _unreadable(path, exc) from None
    adapter = _from_metadata(_metadata(header, path), tensors, path)
    check_shapes(adapter, path)
    return adapter


def read_adapter_header(path: str | Path) -> Adapter:
    """The adapter in ``path`` without its tensors (``tensors`` is empty): name, model, method,
    shots, findings and calibration from the safetensors header alone, without torch, so a
    file picker can describe a file (and ``check_registry_model`` judge it) in milliseconds.
    The same sentences as ``read_adapter`` for a missing or foreign file; damaged tensor data
    is found only when screening reads them."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"The adapter file {path} does not exist.")
    try:
        header = _safetensors_metadata(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise _unreadable(path, exc) from None
    return _from_metadata(_metadata(header, path), {}, path)


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file: an 8-byte little-endian header length, then
    that many bytes of JSON (the format's specification); nothing else is read."""
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if not 1 < n <= min(MAX_HEADER_BYTES, path.stat().st_size - 8):
            raise ValueError(f"header length {n} does not fit the file")
        header = json.loads(fh.read(n).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("__metadata__ is not a string map")
    return meta


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"{path} is not a medalign adapter: it does not read as a safetensors file "
                           f"({type(exc).__name__}).")


def _from_metadata(meta: dict, tensors: dict, path: Path) -> Adapter:
    try:
        return Adapter(
            model=str(meta["model"]), model_sha256=str(meta["model_sha256"]), family=str(meta["family"]),
            method=str(meta["method"]), shots=int(meta["shots"]), findings=[str(f) for f in meta["findings"]],
            tensors=tensors, data=str(meta.get("data", "")), registered=bool(meta.get("registered", False)),
            calibration=None if meta.get("calibration") is None else Calibration.from_dict(meta["calibration"]),
            info=dict(meta.get("info") or {}),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"The adapter {path} is damaged: its metadata lacks or garbles {exc}.") from None


def _metadata(header: dict[str, str], path: Path) -> dict:
    raw = header.get(METADATA_KEY)
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file but not a medalign adapter (it carries no adapter metadata).")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise CheckpointError(f"The adapter {path} is damaged: its metadata is not valid JSON.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path} is a safetensors file but not a medalign adapter (format {found!r}).")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"The adapter {path} has format version {meta.get('version')}; this medalign reads "
                              f"version {FORMAT_VERSION} (adapt the model again with this version).")
    return meta


def check_shapes(adapter: Adapter, path: Path) -> None:
    import torch

    latents = adapter.tensors.get(CLASS_LATENTS)
    n = len(adapter.findings)
    if latents is None or latents.ndim != 3 or latents.shape[:2] != (n, 2) or not torch.isfinite(latents).all():
        shape = None if latents is None else tuple(latents.shape)
        raise CheckpointError(f"The adapter {path} is damaged: {CLASS_LATENTS} has shape {shape}, expected "
                              f"({n}, 2, D) finite values for its {n} findings.")


def check_model(adapter: Adapter, name: str, sha256: str, path: str | Path = "") -> None:
    """Refuse an adapter trained on other weights, naming both models in one sentence."""
    if adapter.model_sha256 == sha256:
        return
    where = f" {path}" if path else ""
    raise CheckpointError(
        f"The adapter{where} was trained for model '{adapter.model}' (weights SHA-256 {adapter.model_sha256[:12]}...), "
        f"not for '{name}' (weights SHA-256 {sha256[:12]}...); adapt '{name}' with medalign adapt or pick its model."
    )


def check_registry_model(adapter: Adapter, name: str, path: str | Path = "") -> None:
    """The same refusal before a registry model is loaded (its pinned SHA-256 is enough),
    so a mismatched adapter costs no model load."""
    from medalign.models import registry

    entry = registry.get(name)  # an unknown name is the registry's own sentence
    if entry.sha256:
        check_model(adapter, entry.name, entry.sha256, path)


def finding_key(finding: str) -> str:
    """How an adapter matches findings: case and spacing do not count."""
    return " ".join(finding.lower().split())


def apply_adapter(prompts: list[PromptLatents], adapter: Adapter) -> list[PromptLatents]:
    """``prompts`` with each adapted finding's ensembled pair replaced by the adapter's class
    embeddings; the per-wording latents stay (the uncertainty reads them) and findings the
    adapter does not know are left as they are."""
    index = {finding_key(f): i for i, f in enumerate(adapter.findings)}
    out = []
    for p in prompts:
        i = index.get(finding_key(p.finding))
        if i is None:
            out.append(p)
            continue
        latents = adapter.class_latents[i].to(device=p.ensemble.device, dtype=p.ensemble.dtype)
        out.append(replace(p, ensemble=latents))
    return out


def adapted_calibration(model_calibration: Calibration, adapter: Adapter | None) -> Calibration:
    """The model's calibration with the adapter's merged over it, finding by finding."""
    if adapter is None or adapter.calibration is None:
        return model_calibration
    return model_calibration.merged(adapter.calibration)


__all__ = [
    "Adapter",
    "FORMAT_VERSION",
    "METHODS",
    "adapted_calibration",
    "apply_adapter",
    "check_model",
    "check_registry_model",
    "finding_key",
    "model_fingerprint",
    "read_adapter",
    "read_adapter_header",
    "save_adapter",
]
