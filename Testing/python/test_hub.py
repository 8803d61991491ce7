"""Built-in models from the Hugging Face Hub: specs as data, pinned, hash-checked, resumable.

Everything runs against ``hub_server.LocalHub`` on 127.0.0.1, which serves the Hub's URL
layout, so ``huggingface_hub`` itself (endpoint, metadata, errors, token) is exercised.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub_server import LocalHub

from medalign.core.errors import CheckpointError
from medalign.models import hub, registry
from medalign.models.spec import builtin_specs, read_spec

CXR_BERT = "microsoft/BiomedVLP-CXR-BERT-specialized"
CXR_BERT_COMMIT = "5157bdba1437a3aed316dacb1a5b68edf96b9902"
WEIGHTS = os.urandom(3 << 20)
ENCODER_FILES = {
    "config.json": b'{"model_type": "bert"}',
    "vocab.txt": b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nlung\n",
    "tokenizer_config.json": b"{}",
    "special_tokens_map.json": b"{}",
    "pytorch_model.bin": os.urandom(4096),
}
# what COLIPRI's spec fetches: its checkpoint holds the BERT weights, so no pickle is downloaded
ENCODER_FETCHED = ("config.json", "vocab.txt")


@pytest.fixture()
def local_hub(tmp_path, monkeypatch):
    """A Hub with COLIPRI's and CXR-BERT's repositories; the client's caches in tmp."""
    with LocalHub() as server:
        server.add("model/microsoft/colipri", {"model.safetensors": WEIGHTS})
        server.add(f"model/{CXR_BERT}", dict(ENCODER_FILES), commit=CXR_BERT_COMMIT)
        for name, value in {
            "HF_ENDPOINT": server.endpoint, "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HOME": str(tmp_path / "hf-home"),
            "MEDALIGN_HOME": str(tmp_path / "home"), "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        }.items():
            monkeypatch.setenv(name, value)
        for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "MEDALIGN_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
            monkeypatch.delenv(name, raising=False)
        yield server


def _cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medalign.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300, **kwargs)


def test_every_builtin_model_is_a_spec_with_licence_card_and_source():
    specs = builtin_specs()
    assert list(specs)[0] == registry.DEFAULT_MODEL  # the embedded one first
    assert {"medalign-demo", "brgsa", "ct-clip", "colipri", "merlin"} <= set(specs)
    for spec in specs.values():
        assert spec.licence and spec.trained_on and spec.citation, spec.name
        assert spec.weights.kind in ("bundled", "hub", "user")
        if spec.weights.kind == "hub":
            assert spec.weights.hub.files and spec.text_encoder.kind == "hub", spec.name
    assert specs["ct-clip"].weights.hub.gated and specs["ct-clip"].weights.hub.repo_type == "dataset"
    assert registry.list_models()[0].name == registry.DEFAULT_MODEL


def test_a_malformed_spec_is_one_sentence(tmp_path):
    bad = tmp_path / "x" / "model.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"spec_version": 1, "name": "x", "family": "medalign", "profile": "p", "licence": "MIT",
                               "weights": {"source": "hub", "repo_id": "a/b"}}))
    with pytest.raises(CheckpointError, match=r"model spec .* is invalid: a Hub source needs 'repo_id' and 'files'"):
        read_spec(bad)


def test_download_pins_commit_and_lfs_hash_then_works_offline(local_hub, monkeypatch):
    paths = registry.download_model("colipri", progress=False)
    weights, encoder = paths
    assert weights.read_bytes() == WEIGHTS and weights.name == "model.safetensors"
    assert sorted(p.name for p in encoder.iterdir()) == sorted(ENCODER_FETCHED)
    # the Hub cache layout, so other Hub tools find the files too
    assert weights.is_symlink() and "blobs" in str(weights.resolve())
    entry = registry.get("colipri")
    commit, shas = hub.pinned(entry.hub_weights)
    assert commit == "0123456789abcdef0123456789abcdef01234567"
    assert shas["model.safetensors"] == hub_sha(WEIGHTS)
    assert registry.weights_status(entry) == "downloaded"
    assert registry.verify("colipri")[0]
    # the token never went to the CDN host, and no request asked for anything twice
    assert all(r["authorization"] is None for r in local_hub.requests_for("/cdn/"))
    seen = len(local_hub.state.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert registry.resolve_weights(entry, progress=False) == weights
    assert registry.resolve_text_encoder(entry, progress=False) == encoder
    assert len(local_hub.state.requests) == seen


def hub_sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_later_runs_use_the_pinned_commit_not_the_moving_branch(local_hub):
    registry.download_model("colipri", progress=False)
    local_hub.state.repos["model/microsoft/colipri"].commit = "f" * 40  # "main" moved on upstream
    pinned_path = registry.resolve_weights(registry.get("colipri"), progress=False)
    assert "0123456789abcdef" in str(pinned_path)


def test_bytes_that_do_not_match_the_hubs_hash_are_refused_and_not_kept(local_hub):
    local_hub.state.repos["model/microsoft/colipri"].wrong_bytes.add("model.safetensors")
    with pytest.raises(CheckpointError, match="SHA-256 .* was expected; it was deleted"):
        registry.download_model("colipri", progress=False)
    assert registry.weights_status(registry.get("colipri")) == "not downloaded"
    assert not list((Path(os.environ["HF_HUB_CACHE"])).rglob("*.part"))


def test_a_tampered_cached_file_is_caught_by_verify(local_hub):
    weights, _ = registry.download_model("colipri", progress=False)
    blob = weights.resolve()
    blob.write_bytes(b"x" + blob.read_bytes()[1:])
    ok, message = registry.verify("colipri")
    assert not ok and "SHA-256" in message


def test_offline_and_not_downloaded_names_the_file_and_the_way_by_hand(local_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as caught:
        registry.resolve_weights(registry.get("colipri"), progress=False)
    message = str(caught.value)
    assert "model.safetensors of microsoft/colipri is not downloaded" in message
    assert "medalign models add colipri --weights PATH" in message and "\n" not in message


def test_an_unreachable_hub_is_one_sentence_that_mentions_the_proxy(local_hub, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{dead}")
    with pytest.raises(CheckpointError, match=r"Cannot reach http://127\.0\.0\.1:\d+ .*behind a proxy \(set HTTPS_PROXY\)"):
        registry.download_model("colipri", progress=False)


def test_a_gated_repository_asks_for_the_terms_and_a_token_then_uses_hf_token(local_hub, monkeypatch):
    local_hub.state.repos["model/microsoft/colipri"].gated_token = "hf_secret"
    with pytest.raises(CheckpointError, match="gated repository: accept its terms .* HF_TOKEN"):
        registry.download_model("colipri", progress=False)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    weights, _ = registry.download_model("colipri", progress=False)
    assert weights.read_bytes() == WEIGHTS
    resolves = local_hub.requests_for("/resolve/")
    assert any(r["authorization"] == "Bearer hf_secret" for r in resolves)
    assert all(r["authorization"] is None for r in local_hub.requests_for("/cdn/"))


def test_cli_download_is_resumed_after_a_kill(local_hub, tmp_path):
    """A killed transfer continues where it stopped (HTTP Range), across processes."""
    local_hub.state.bytes_per_second = 1 << 20  # 3 MB take about 3 s
    child = subprocess.Popen([sys.executable, "-m", "medalign.cli", "models", "download", "colipri", "--quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))
    hf_cache = Path(os.environ["HF_HUB_CACHE"])
    deadline = time.monotonic() + 60
    parts: list[Path] = []
    while time.monotonic() < deadline:
        parts = [p for p in hf_cache.rglob("*.part") if p.stat().st_size > (512 << 10)]
        if parts:
            break
        time.sleep(0.05)
    assert parts, "the download never started"
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    kept = parts[0].stat().st_size
    assert 0 < kept < len(WEIGHTS)
    local_hub.state.bytes_per_second = None
    done = _cli("models", "download", "colipri", "--quiet")
    assert done.returncode == 0, done.stderr
    ranges = [r["range"] for r in local_hub.requests_for("/cdn/") if r["method"] == "GET" and r["path"].endswith("model.safetensors")]
    assert ranges[-1] is not None and int(ranges[-1].split("=")[1].rstrip("-")) >= kept
    assert "is ready" in done.stdout
    listed = _cli("models", "list", "--json")
    row = next(r for r in json.loads(listed.stdout) if r["name"] == "colipri")
    assert row["status"] == "downloaded" and row["licence"] == "MIT" and row["source"] == "hub"


def test_cli_progress_lines_report_the_download_for_the_panel(local_hub):
    done = _cli("models", "download", "colipri", "--progress-lines")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("MEDALIGN-PROGRESS")]
    fractions = [float(line.split()[1]) for line in lines]
    assert fractions and fractions[-1] == pytest.approx(1.0) and "model.safetensors" in " ".join(lines)


def test_cli_errors_about_the_hub_are_one_line_exit_2(local_hub):
    done = _cli("models", "download", "colipri", env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("medalign: error: ")
