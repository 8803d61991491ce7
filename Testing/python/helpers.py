"""Small builders shared by the engine tests (synthetic CTs, tiny models and checkpoints).

They live here, not in the engine: product modules hold only what the product uses."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from medalign.core.volume import Volume


def synthetic_ct(shape_kji=(40, 64, 64), spacing=(5.0, 5.0, 6.0), seed: int = 0, blob_ras=None) -> Volume:
    """A body-like CT: air outside, soft tissue ellipse, two lungs, optional dense blob."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape_kji], indexing="ij")
    arr = np.full(shape_kji, -1000, dtype=np.float32)
    cj, ci = shape_kji[1] / 2, shape_kji[2] / 2
    body = ((i - ci) / (0.45 * shape_kji[2])) ** 2 + ((j - cj) / (0.35 * shape_kji[1])) ** 2 < 1
    arr[body] = 40
    for side in (-1, 1):
        lung = ((i - ci - side * 0.2 * shape_kji[2]) / (0.14 * shape_kji[2])) ** 2 + ((j - cj) / (0.22 * shape_kji[1])) ** 2 < 1
        arr[lung] = -850
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [160.0, 160.0, -100.0]
    vol = Volume(arr, affine, {"path": "synthetic"})
    if blob_ras is not None:
        c = vol.ras_to_ijk_points(np.asarray(blob_ras)[None])[0]
        d2 = (i - c[0]) ** 2 + (j - c[1]) ** 2 + (k - c[2]) ** 2
        arr[d2 < 4] = 300
    arr += rng.normal(0, 10, shape_kji).astype(np.float32)
    vol.array = np.round(arr).astype(np.int16)
    return vol


def tiny_config():
    """A minute medalign model configuration: the real code paths, milliseconds per forward."""
    from medalign.models.medalign_model import MedAlignConfig
    from medalign.models.profiles import PreprocessProfile
    from medalign.models.vit3d import ViT3DConfig

    return MedAlignConfig(
        vit=ViT3DConfig(width=32, depth=1, heads=2, mlp_dim=64, patch_size=(2, 2, 2), base_size=(8, 8, 8), in_channels=8),
        stem_channels=(4, 8),
        embed_dim=32,
        bank_size=16,
        profile=PreprocessProfile(name="medalign-tiny", spacing=(8.0, 8.0, 8.0), size=(32, 32, 32)),
    )


def tiny_test_model(seed: int = 0, device: str = "cpu"):
    """Deterministic tiny medalign model with the real MiniLM text encoder."""
    import torch

    from medalign.models.medalign_model import MedAlignModel, build_text_encoder

    torch.manual_seed(seed)
    model = MedAlignModel(tiny_config(), text_encoder=None)
    model.text_encoder = build_text_encoder(None, model.cfg)
    return model.to(device).eval()


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    from medalign.models.medalign_model import save_checkpoint

    return save_checkpoint(tiny_test_model(seed), path, extra={"thresholds": {"Lung nodule": 0.4}})


def new_app():
    """A fresh slicer-core application (real MRML scene, volume I/O, views) for glue tests."""
    from trame_slicer.core import SlicerApp

    return SlicerApp()


def assert_one_sentence(err: BaseException, *must_name: str) -> str:
    """The error's text is one sentence (no newline, no second sentence) naming each of ``must_name``."""
    msg = str(err)
    assert "\n" not in msg and msg.endswith("."), msg
    assert re.search(r"[.!?]\s+[A-Z]", msg) is None, f"more than one sentence: {msg}"
    for name in must_name:
        assert name in msg, f"{name!r} not named in: {msg}"
    return msg


def lung_nodule_adapter(path: Path, model: str, sha256: str, shots: int = 2) -> Path:
    """A ``medalign adapt`` file of 'Lung nodule' for ``model`` (fixed random class
    embeddings of the tiny model's width, tied to weights ``sha256``) written to ``path``."""
    import torch

    from medalign.inference.adapter import Adapter, save_adapter

    latents = torch.nn.functional.normalize(torch.randn(1, 2, 32, generator=torch.Generator().manual_seed(3)), dim=-1)
    return save_adapter(Adapter(model=model, model_sha256=sha256, family="medalign", method="vip+kmat", shots=shots,
                                findings=["Lung nodule"], tensors={"class_latents": latents}, registered=True), path)


def assert_adapted_scores(shown, volume: Volume, model: str, findings: list[str], adapter: Path,
                          tol: float = 1e-4) -> None:
    """``shown`` (a ScreeningResult) carries ``adapter``'s scores: equal to the engine's
    screening with it, and its Lung nodule differs from the model's own zero-shot one."""
    import pytest

    from medalign.inference.screener import Screener

    adapted = Screener(model=model, findings=findings, device="cpu", adapter=adapter)(volume, with_maps=False)
    plain = Screener(model=model, findings=findings, device="cpu")(volume, with_maps=False)
    for name in findings:
        assert shown.finding(name).probability == pytest.approx(adapted.finding(name).probability, abs=tol)
    assert shown.finding("Lung nodule").probability != pytest.approx(plain.finding("Lung nodule").probability, abs=1e-3)

