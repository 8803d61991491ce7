"""Encoded images kept in memory, so a second screening of the same volume skips the image side.

A second screening of a volume already in memory (other findings, the console's or a
script's second click) needs only the text side and the scoring: preprocessing and image
encoding are most of a screening's cost. ``encoded_image`` keeps the last encodings
(``ImageFeatures``, the prepared grid's geometry and the coverage warnings) in a small LRU
bounded in entries and in bytes, keyed by everything the encoding depends on:

* **the voxels**: xxh3-128 of the array's bytes, with its dtype, shape and ijk->RAS.
  A content digest, not ``id()`` plus a counter: the Slicer glue copies a node's voxels
  for every call (a new array each time, so an id would never hit) and NumPy writes in
  place without telling anyone (a counter would miss them). Measured on a 512x512x300
  int16 CT (157 MB, shared 2-core machine): xxh3-128 0.015 s, crc32 0.21 s, SHA-1 0.30 s,
  BLAKE2b 0.76 s; only xxh3 fits the 0.5 s second-click budget.
* **the model**: the object itself (held weakly) and every parameter's and buffer's
  storage and in-place version counter. Torch bumps a tensor's version on every in-place
  write (an optimizer step, ``load_state_dict``), so changed weights miss, for free;
  hashing CT-CLIP's 1.7 GB of weights on every call would cost seconds.
* the profile, the device and the precision.

``MEDALIGN_FEATURE_CACHE_MB`` sets the byte budget (default 1024; 0 turns the cache off).
Only the panel's and the web viewer's child processes (one per run) do not profit: each
starts empty.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from medalign.core.volume import Volume
from medalign.inference.preprocess import PreparedImage
from medalign.models.base import ImageFeatures, ScreeningModel

__all__ = ["EncodedImage", "encoded_image", "clear_feature_cache", "volume_digest", "MAX_ENTRIES"]

MAX_ENTRIES = 2  # the volume on screen and the one before it; a cohort never comes back to a case
_DEFAULT_MB = 1024


@dataclass
class EncodedImage:
    """What screening needs of an image once it is encoded.

    ``prepared`` keeps the model grid's geometry (``grid_to_ras``, profile, source shape);
    its tensor is dropped (an empty tensor) so an entry costs the features, not the input.
    """

    features: ImageFeatures
    prepared: PreparedImage
    coverage: list[str]

    def nbytes(self) -> int:
        f = self.features
        return sum(t.numel() * t.element_size() for t in (f.global_latent, f.tokens))


def volume_digest(volume: Volume) -> str:
    """xxh3-128 over the voxels, their dtype and shape, and the ijk->RAS matrix."""
    import xxhash

    array = np.ascontiguousarray(volume.array)
    h = xxhash.xxh3_128()
    h.update(f"{array.dtype.str}|{array.shape}|".encode())
    h.update(np.ascontiguousarray(volume.ijk_to_ras, dtype=np.float64).tobytes())
    h.update(memoryview(array).cast("B"))
    return h.hexdigest()


def _weights_state(model: ScreeningModel) -> tuple:
    """Storage and in-place version of every tensor of ``model``: any change of weights changes it."""
    tensors = [*model.parameters(), *model.buffers()]
    return tuple((t.data_ptr(), t._version) for t in tensors)


def _budget_bytes() -> int:
    text = os.environ.get("MEDALIGN_FEATURE_CACHE_MB", "").strip()
    try:
        mb = float(text) if text else _DEFAULT_MB
    except ValueError:
        mb = _DEFAULT_MB  # a typo costs speed, never a screening
    return max(0, int(mb * 2**20))


class _Cache:
    """LRU of ``EncodedImage`` by key, bounded in entries and bytes; safe across threads."""

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple, tuple[weakref.ref, EncodedImage]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple, model: ScreeningModel) -> EncodedImage | None:
        with self.lock:
            found = self.entries.get(key)
            if found is None or found[0]() is not model:  # an id reused by another model
                return None
            self.entries.move_to_end(key)
            return found[1]

    def put(self, key: tuple, model: ScreeningModel, encoded: EncodedImage) -> None:
        budget = _budget_bytes()
        with self.lock:
            self.entries.pop(key, None)
            if encoded.nbytes() > budget:
                return
            self.entries[key] = (weakref.ref(model), encoded)
            while len(self.entries) > MAX_ENTRIES or sum(e.nbytes() for _, e in self.entries.values()) > budget:
                self.entries.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


_CACHE = _Cache()


def clear_feature_cache() -> None:
    """Forget every kept encoding (tests, or to free the memory at once)."""
    _CACHE.clear()


def encoded_image(
    volume: Volume,
    model: ScreeningModel,
    device: torch.device,
    precision: str,
    encode: Callable[[], tuple[ImageFeatures, PreparedImage]],
) -> EncodedImage:
    """The kept encoding of ``volume`` by ``model`` on ``device``, or ``encode()``'s, kept for next time."""
    from medalign.inference.coverage import coverage_warnings

    if _budget_bytes() == 0:
        features, prepared = encode()
        return EncodedImage(features, prepared, coverage_warnings(prepared))
    key = (volume_digest(volume), id(model), _weights_state(model), model.profile, str(device), precision)
    found = _CACHE.get(key, model)
    if found is not None:
        return found
    features, prepared = encode()
    # a plain empty tensor (the input may be a MetaTensor, whose new_empty takes no int)
    empty = torch.empty(0, dtype=prepared.tensor.dtype, device=prepared.tensor.device)
    encoded = EncodedImage(features, replace(prepared, tensor=empty), coverage_warnings(prepared))
    _CACHE.put(key, model, encoded)
    return encoded
