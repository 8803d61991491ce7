"""Text-latent cache on disk: a repeated screening in a new process encodes no text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FINDINGS = "Lung nodule;Emphysema"

# A fresh process: a tiny real model whose class counts the texts it encodes, one Screener,
# one screening; prints the encoded-text count and the probabilities.
CHILD = """
import json, sys
from helpers import synthetic_ct, tiny_test_model
from medalign.models.medalign_model import MedAlignModel
from medalign.inference.screener import Screener

encoded = []
original = MedAlignModel.text_latents
def counting(self, texts):
    encoded.extend(texts)
    return original(self, texts)
MedAlignModel.text_latents = counting

screener = Screener(tiny_test_model(seed=int(sys.argv[1])), findings=sys.argv[2], device="cpu")
result = screener(synthetic_ct(), with_maps=False)
print(json.dumps({"encoded": len(encoded), "probs": [f.probability for f in result.findings]}))
"""


def _run(home: Path, seed: int = 0, cache: str = "on") -> dict:
    env = dict(os.environ, MEDALIGN_HOME=str(home), MEDALIGN_TEXT_CACHE=cache)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", CHILD, str(seed), FINDINGS], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cache_files(home: Path) -> list[Path]:
    return sorted((home / "text-latents").rglob("*.safetensors"))


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> tuple[Path, dict]:
    home = tmp_path_factory.mktemp("home")
    return home, _run(home)


def test_second_process_encodes_no_text_and_scores_identically(first):
    home, cold = first
    assert cold["encoded"] > 0 and _cache_files(home)
    warm = _run(home)
    assert warm["encoded"] == 0
    uncached = _run(home, cache="off")
    assert uncached["encoded"] == cold["encoded"]
    assert warm["probs"] == uncached["probs"] == cold["probs"]


def test_other_weights_do_not_reuse_entries(first):
    home, cold = first
    other = _run(home, seed=1)
    assert other["encoded"] == cold["encoded"]


def test_corrupt_cache_file_is_ignored_and_rewritten(first):
    home, cold = first
    files = _cache_files(home)
    files[0].write_bytes(b"not a safetensors file")
    files[1].write_bytes(files[1].read_bytes()[:20])
    again = _run(home)
    assert again["encoded"] == cold["encoded"] and again["probs"] == cold["probs"]
    assert _run(home)["encoded"] == 0


def test_cache_off_writes_nothing(tmp_path):
    assert _run(tmp_path, cache="off")["encoded"] > 0
    assert not _cache_files(tmp_path)
