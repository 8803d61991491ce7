"""CUDA paths: run where a GPU is lent (skipped with a reason elsewhere; CPU CI skips them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import synthetic_ct

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# bf16 keeps 8 bits of mantissa: probabilities of a softmax over two logits move by well
# under 0.03 on the demo model; maps are compared by where they peak and by correlation.
PROB_TOL = 0.03


def _screen(precision: str):
    from medalign.inference.screener import screen

    return screen(synthetic_ct(), findings="ct-rate", device="cuda", precision=precision)


def test_bf16_matches_float32_on_gpu():
    a, b = _screen("float32"), _screen("bf16")
    for fa, fb in zip(a.findings, b.findings):
        assert abs(fa.probability - fb.probability) < PROB_TOL, fa.name
        r = np.corrcoef(fa.map.array.ravel(), fb.map.array.ravel())[0, 1]
        assert r > 0.98, fa.name
    assert a.device.startswith("cuda")


def test_gpu_matches_cpu_in_float32():
    from medalign.inference.screener import screen

    gpu = _screen("float32")
    cpu = screen(synthetic_ct(), findings="ct-rate", device="cpu", precision="float32")
    for fg, fc in zip(gpu.findings, cpu.findings):
        assert abs(fg.probability - fc.probability) < 1e-3, fg.name


def test_training_on_gpu_in_bf16_lowers_the_loss(tmp_path):
    """The CUDA training path with --precision bf16 and a deeper local path: float32 weights out."""
    import dataclasses

    from helpers import tiny_config
    from test_train_eval import _cohort

    from medalign.models.medalign_model import read_checkpoint
    from medalign.training.config import TrainConfig
    from medalign.training.loop import train

    out = tmp_path / "gpu.safetensors"
    train(TrainConfig(data=_cohort(tmp_path / "cohort"), out=out, steps=30, batch_size=4, lr=2e-3, warmup=5,
                      device="cuda", precision="bf16", model_config=dataclasses.replace(tiny_config(), local_blocks=1)),
          progress=False)
    _, tensors, extra = read_checkpoint(out)
    assert extra["precision"] == "bf16" and extra["final_loss"] < extra["initial_loss"]
    assert all(t.dtype == torch.float32 for t in tensors.values())
