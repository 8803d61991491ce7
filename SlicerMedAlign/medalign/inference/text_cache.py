"""Text latents on disk, keyed by model identity and prompt text.

Encoding a finding list's prompts is the text side of every screening; a repeated
screening (a second Slicer click, a new process over the same model) should encode no
text. Each prompt's latent is one small safetensors file (never pickle), written through
``core.atomic`` so concurrent processes only ever replace whole files; a file that does
not read back is ignored and rewritten. ``MEDALIGN_TEXT_CACHE=off`` turns it off.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from medalign.core.atomic import atomic_output
from medalign.models.base import ScreeningModel

__all__ = ["cached_text_latents", "model_identity", "state_digest", "text_cache_dir", "text_cache_enabled"]

_FOLDER = "text-latents"


def text_cache_enabled() -> bool:
    """False when ``MEDALIGN_TEXT_CACHE`` is off/0/false/no."""
    return os.environ.get("MEDALIGN_TEXT_CACHE", "on").strip().lower() not in {"off", "0", "false", "no"}


def text_cache_dir() -> Path:
    """Under the registry's cache folder (``MEDALIGN_HOME`` wins there)."""
    from medalign.models.registry import cache_dir

    return cache_dir() / _FOLDER


def state_digest(model: ScreeningModel) -> str:
    """SHA-256 over every tensor of ``model``: any weight change (text side included) is a new key."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(str(value.dtype).encode())
        h.update(value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_identity(model: ScreeningModel, registry_name: str | None) -> str:
    """Registry name + its weights' SHA-256 + text encoder; in-memory models: a state digest.

    A registry entry without a recorded SHA-256, and any model object the caller built,
    is identified by its weights themselves, so two models with other weights never share
    entries.
    """
    if registry_name is not None:
        from medalign.core.errors import CheckpointError
        from medalign.models import registry

        try:
            entry = registry.get(registry_name)
        except CheckpointError:  # no longer registered (removed since it was loaded): go by its weights
            entry = None
        if entry is not None and entry.sha256:
            return f"{entry.name}|{entry.sha256}|{entry.text_encoder or 'default'}"
    return f"object|{state_digest(model)}"


def _path(identity: str, text: str) -> Path:
    folder = hashlib.sha256(identity.encode()).hexdigest()[:32]
    name = hashlib.sha256(text.encode()).hexdigest()
    return text_cache_dir() / folder / name[:2] / f"{name}.safetensors"


def _read(path: Path, text: str) -> torch.Tensor | None:
    """The stored latent, or None when missing, unreadable or not this text's."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("text") != text:
                return None
            return fh.get_tensor("latent")
    except Exception:  # a torn, foreign or corrupt file: ignored and rewritten, never an error
        return None


def _write(path: Path, text: str, latent: torch.Tensor) -> None:
    from safetensors.torch import save_file

    try:
        with atomic_output(path) as tmp:
            save_file({"latent": latent.detach().to("cpu").contiguous()}, str(tmp), metadata={"text": text})
    except OSError:  # a read-only or full cache folder costs speed, never the screening
        pass


def cached_text_latents(
    identity: str, texts: list[str], encode: Callable[[list[str]], torch.Tensor]
) -> torch.Tensor:
    """(N, D) float latents for ``texts``; ``encode`` runs only when some text is not on disk."""
    if not text_cache_enabled():
        return encode(texts).float()
    paths = [_path(identity, t) for t in texts]
    found = [_read(p, t) for p, t in zip(paths, texts)]
    missing = [i for i, f in enumerate(found) if f is None]
    if missing:
        # The whole list, not only the misses: a text encoder's output moves in the last bit
        # with the batch's padding, and a miss must give exactly what no cache would give.
        fresh = encode(texts).float().cpu()
        for i in missing:
            _write(paths[i], texts[i], fresh[i])
        return fresh
    return torch.stack([f.float() for f in found])
