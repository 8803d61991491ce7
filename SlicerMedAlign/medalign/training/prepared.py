"""Cases brought onto the model grid once before training (optionally cached on disk),
their lesion masks carried onto the local-token grid, and the per-batch jitter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medalign.core.atomic import atomic_output
from medalign.data.cohorts import Case


class PreparedCohort:
    """Cases preprocessed once to the model grid (float16 on CPU), cached on disk if asked.

    Where a case has a lesion mask, its bits are also brought onto the model's local-token
    grid (a token carries bit f when any of its 2x2x2 sub-samples lies in lesion f), for
    the dense token-text loss.
    """

    def __init__(self, cases: list[Case], profile, token_stride: int, cache: Path | None, progress: bool,
                 workers: int | None = 1) -> None:
        from tqdm import tqdm

        from medalign.core.parallel import ordered_map

        self.cases = cases
        self.images: list[torch.Tensor] = []
        self.token_masks: list[torch.Tensor | None] = []
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
        key = cache_key(profile, token_stride)
        jobs = [(case, profile, token_stride, cache / f"{case.case_id}.{key}.pt" if cache is not None else None)
                for case in cases]
        for item in tqdm(ordered_map(_prepared_item, jobs, workers), total=len(jobs), desc="preprocessing",
                         disable=not progress, unit="ct"):
            self.images.append(item["image"])
            self.token_masks.append(item.get("tokens"))

    def __len__(self) -> int:
        return len(self.cases)


# Bump when token_mask's meaning changes, so caches made by older code are not reused.
TOKEN_MASK_VERSION = 2


def cache_key(profile, stride: int) -> str:
    """Cache file tag: changes whenever the profile, the token stride or the mask rule does."""
    import hashlib
    import json

    blob = json.dumps([profile.to_dict(), int(stride), TOKEN_MASK_VERSION], sort_keys=True)
    return f"{profile.name}.{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def _prepared_item(job: tuple) -> dict[str, torch.Tensor]:
    """One case on the model grid (float16) plus its token mask; read from or written to the cache."""
    from medalign.core.volume_io import read_volume
    from medalign.inference.preprocess import prepare

    case, profile, stride, cached = job
    if cached is not None and cached.is_file():
        return torch.load(cached, weights_only=True)
    prepared = prepare(read_volume(case.volume_path), profile)
    item = {"image": prepared.tensor[0].to(torch.float16).contiguous()}
    if case.mask_path is not None:
        item["tokens"] = token_mask(read_volume(case.mask_path), prepared.grid_to_ras, profile.size, stride)
    if cached is not None:  # a unique temp name: torchrun ranks and workers may race on a case
        with atomic_output(cached) as tmp:
            torch.save(item, tmp)
    return item


def token_mask(mask, grid_to_ras: np.ndarray, size: tuple[int, int, int], stride: int) -> torch.Tensor:
    """(X', Y', Z') int32 bitmask of a lesion mask on the local-token grid of a model grid.

    Every lesion voxel is carried to the token it falls in, so a 2 mm calcification marks
    its 16 mm token (point sampling at token resolution would miss most of them)."""
    grid = np.array([n // stride for n in size])
    values = mask.array
    k, j, i = np.nonzero(values)
    out = np.zeros(int(np.prod(grid)), dtype=np.int64)
    if len(k) == 0:
        return torch.from_numpy(out.reshape(*grid).astype(np.int32))
    bits = values[k, j, i].astype(np.int64)
    ras = mask.ijk_to_ras_points(np.stack([i, j, k], axis=1))
    to_grid = np.linalg.inv(grid_to_ras)
    xyz = ras @ to_grid[:3, :3].T + to_grid[:3, 3]
    # model voxel n spans [n - 0.5, n + 0.5); token a holds voxels a*stride .. (a+1)*stride - 1
    tok = np.floor((xyz + 0.5) / stride).astype(np.int64)
    inside = np.all((tok >= 0) & (tok < grid), axis=1)
    lin = np.ravel_multi_index(tuple(tok[inside].T), tuple(grid))
    bits = bits[inside]
    for bit in range(int(bits.max()).bit_length() if len(bits) else 0):
        hit = ((bits >> bit) & 1).astype(bool)
        if hit.any():
            out[np.bincount(lin[hit], minlength=len(out)) > 0] |= 1 << bit
    return torch.from_numpy(out.reshape(*grid).astype(np.int32))


def augment(images: list[torch.Tensor], tokens: list[torch.Tensor | None], stride: int, gen: torch.Generator,
             device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Cheap, label-preserving jitter of a batch, on ``device``: a shift by whole tokens (so
    token masks shift with the image) and a small intensity change.  Every random choice
    comes from ``gen`` (the noise through a seed drawn from it), so runs are reproducible
    and resumable on any device."""
    out, shifted = [], []
    for x, t in zip(images, tokens):
        steps = [int(v) for v in torch.randint(-1, 2, (3,), generator=gen)]
        scale = 1.0 + 0.05 * (torch.rand(1, generator=gen).item() - 0.5)
        out.append(torch.roll(x.to(device).float(), shifts=[s * stride for s in steps], dims=(-3, -2, -1)) * scale)
        shifted.append(torch.roll(t, shifts=steps, dims=(-3, -2, -1)) if t is not None else None)
    x = torch.stack(out)
    noise_gen = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    return x.add_(torch.randn(x.shape, generator=noise_gen, device=device), alpha=0.02), shifted
