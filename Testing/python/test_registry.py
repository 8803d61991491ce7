"""Model registry: builtins, user entries persisted in MEDALIGN_HOME, SHA-256 checks and
their memo, offline mode, and the one-sentence errors users see."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

from medalign.core.errors import CheckpointError, InputError
from medalign.core.resources import resources_dir
from medalign.models import download as download_module
from medalign.models import registry

CONTENT = bytes(range(256)) * 40
CONTENT_SHA = hashlib.sha256(CONTENT).hexdigest()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MEDALIGN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEDALIGN_OFFLINE", raising=False)
    return tmp_path / "home"


@pytest.fixture
def weights(tmp_path) -> Path:
    path = tmp_path / "w" / "model.safetensors"
    path.parent.mkdir()
    path.write_bytes(CONTENT)
    return path


@pytest.fixture
def fake_resources(tmp_path, monkeypatch) -> Path:
    """An installation whose resources folder we control: the package's model specs, no
    weights and no cards (a test adds them)."""
    root = tmp_path / "resources"
    for spec in (resources_dir() / "models").glob("*/model.json"):
        (root / "models" / spec.parent.name).mkdir(parents=True)
        shutil.copy(spec, root / "models" / spec.parent.name / "model.json")
    monkeypatch.setattr(registry, "resources_dir", lambda: root)
    return root


@pytest.fixture
def no_sockets(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a socket was opened")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ----------------------------------------------------------------- locations


def test_cache_dir_honours_medalign_home(home):
    assert registry.cache_dir() == home


@pytest.mark.parametrize(
    "platform, env, expected",
    [
        ("linux", {"XDG_CACHE_HOME": "/xdg"}, Path("/xdg/medalign")),
        ("linux", {}, Path.home() / ".cache" / "medalign"),
        ("darwin", {}, Path.home() / "Library" / "Caches" / "medalign"),
        ("win32", {"LOCALAPPDATA": "/appdata"}, Path("/appdata/medalign")),
    ],
)
def test_cache_dir_platform_defaults(monkeypatch, platform, env, expected):
    for key in ("MEDALIGN_HOME", "XDG_CACHE_HOME", "LOCALAPPDATA"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "platform", platform)
    assert registry.cache_dir() == expected


def test_resources_dir_is_inside_the_package():
    assert registry.resources_dir() == Path(registry.__file__).resolve().parents[1] / "resources"


# ----------------------------------------------------------------- builtins


def test_builtins_listed_default_first(home):
    entries = registry.list_models()
    assert [e.name for e in entries] == [registry.DEFAULT_MODEL, "brgsa", "colipri", "ct-clip", "merlin"]
    assert {e.name: e.family for e in entries} == {
        "medalign-demo": "medalign", "brgsa": "brgsa", "colipri": "colipri", "ct-clip": "ct-clip", "merlin": "merlin"
    }
    assert all(e.builtin for e in entries)
    assert registry.get("brgsa").weights is None


def test_unknown_model_names_the_known_ones(home):
    with pytest.raises(CheckpointError) as info:
        registry.get("nope")
    assert str(info.value) == "Unknown model 'nope' (known: medalign-demo, brgsa, colipri, ct-clip, merlin)."


def test_unregistered_builtin_says_how_to_register(home):
    with pytest.raises(CheckpointError) as info:
        registry.resolve_weights(registry.get("brgsa"))
    assert str(info.value).startswith("Model 'brgsa' has no weights registered (the authors' checkpoint")
    assert str(info.value).endswith("; run: medalign models add brgsa --weights PATH --sha256 HEX")


def test_models_load_reports_missing_registration(home):
    from medalign import models

    with pytest.raises(CheckpointError, match="medalign models add brgsa"):
        models.load("brgsa")


def test_demo_missing_is_a_clear_error(home, fake_resources):
    with pytest.raises(CheckpointError, match="embedded demo model is missing"):
        registry.resolve_weights(registry.get(registry.DEFAULT_MODEL))
    ok, message = registry.verify(registry.DEFAULT_MODEL)
    assert not ok and "embedded demo model is missing" in message


def test_demo_weights_and_card_come_from_resources(home, fake_resources):
    folder = fake_resources / "models" / "medalign-demo"
    (folder / "model.safetensors").write_bytes(CONTENT)
    (folder / "model.safetensors.sha256").write_text(f"{CONTENT_SHA.upper()}  model.safetensors\n")
    (folder / "MODEL_CARD.md").write_text("# demo card\n")
    entry = registry.get(registry.DEFAULT_MODEL)
    assert entry.sha256 == CONTENT_SHA and entry.card == folder / "MODEL_CARD.md"
    assert registry.resolve_weights(entry) == folder / "model.safetensors"
    assert registry.verify(registry.DEFAULT_MODEL)[0]

    (folder / "model.safetensors").write_bytes(CONTENT[::-1])
    with pytest.raises(CheckpointError, match="SHA-256"):
        registry.resolve_weights(registry.get(registry.DEFAULT_MODEL))


# ----------------------------------------------------------------- user entries


def test_add_persists_and_infers_family(home, weights):
    entry = registry.add("ct-clip", weights, CONTENT_SHA.upper(), description="mine")
    assert entry.family == "ct-clip" and entry.builtin and entry.sha256 == CONTENT_SHA
    stored = json.loads((home / "registry.json").read_text(encoding="utf-8"))
    assert stored["models"]["ct-clip"]["weights"] == str(weights.resolve())

    other = registry.add("my-model", weights, CONTENT_SHA)
    assert other.family == "medalign" and not other.builtin
    names = [e.name for e in registry.list_models()]
    assert names == ["medalign-demo", "brgsa", "colipri", "ct-clip", "merlin", "my-model"]
    # a fresh read of the file (as a new process would do) sees the same entries
    assert registry.get("my-model").weights == str(weights.resolve())
    assert registry.resolve_weights(registry.get("ct-clip")) == weights.resolve()


def test_add_refuses_bad_input(home, weights, tmp_path):
    with pytest.raises(CheckpointError, match="cannot be replaced"):
        registry.add(registry.DEFAULT_MODEL, weights, CONTENT_SHA)
    with pytest.raises(InputError, match="not a SHA-256"):
        registry.add("m", weights, "1234")
    with pytest.raises(InputError, match="Unknown model family"):
        registry.add("m", weights, CONTENT_SHA, family="resnet")
    with pytest.raises(InputError, match="belongs to family 'brgsa'"):
        registry.add("brgsa", weights, CONTENT_SHA, family="ct-clip")
    with pytest.raises(InputError, match="not found"):
        registry.add("m", tmp_path / "absent.pt", CONTENT_SHA)
    with pytest.raises(InputError, match="Text encoder folder not found"):
        registry.add("m", weights, CONTENT_SHA, text_encoder=tmp_path / "no-bert")
    with pytest.raises(CheckpointError, match=f"SHA-256 {CONTENT_SHA}"):
        registry.add("m", weights, "f" * 64)
    assert not (home / "registry.json").exists()


def test_text_encoder_is_stored_absolute(home, weights, tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    entry = registry.add("brgsa", weights, CONTENT_SHA, text_encoder=bert)
    assert entry.text_encoder == str(bert.resolve())


def test_remove(home, weights):
    registry.add("ct-clip", weights, CONTENT_SHA)
    registry.add("mine", weights, CONTENT_SHA)
    registry.remove("mine")
    with pytest.raises(CheckpointError, match="Unknown model 'mine'"):
        registry.get("mine")
    registry.remove("ct-clip")
    assert registry.get("ct-clip").weights is None  # back to the unregistered builtin
    assert weights.exists()  # the user's own file is never deleted
    with pytest.raises(CheckpointError, match="built in"):
        registry.remove("ct-clip")
    with pytest.raises(CheckpointError, match="Unknown model 'ghost'"):
        registry.remove("ghost")


def test_corrupt_registry_file_is_one_sentence(home):
    home.mkdir(parents=True)
    (home / "registry.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="registry .* is corrupt"):
        registry.list_models()


def test_user_file_deleted_after_registration(home, weights):
    registry.add("mine", weights, CONTENT_SHA)
    weights.unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        registry.resolve_weights(registry.get("mine"))
    ok, message = registry.verify("mine")
    assert not ok and "does not exist" in message


# ----------------------------------------------------------------- hashing and memo


def test_sha_memo_avoids_rehashing_until_file_changes(home, weights, monkeypatch):
    calls: list[Path] = []
    real = download_module.sha256_file

    def counting(path, *args, **kwargs):
        calls.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(download_module, "sha256_file", counting)
    registry.add("mine", weights, CONTENT_SHA)  # hashes once at registration
    assert len(calls) == 1
    for _ in range(3):
        registry.resolve_weights(registry.get("mine"))
    assert len(calls) == 1
    memo = json.loads((home / "verified.json").read_text(encoding="utf-8"))
    assert memo[str(weights.resolve())]["sha256"] == CONTENT_SHA

    # same content, new mtime: the memo no longer vouches for it, so hash again
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    registry.resolve_weights(registry.get("mine"))
    assert len(calls) == 2


def test_changed_file_fails_resolution(home, weights):
    registry.add("mine", weights, CONTENT_SHA)
    weights.write_bytes(CONTENT + b"tampered")
    with pytest.raises(CheckpointError) as info:
        registry.resolve_weights(registry.get("mine"))
    assert CONTENT_SHA in str(info.value) and "\n" not in str(info.value)


def test_verify_rehashes_even_when_size_and_mtime_match(home, weights):
    registry.add("mine", weights, CONTENT_SHA)
    ok, message = registry.verify("mine")
    assert ok and CONTENT_SHA in message
    stat = weights.stat()
    weights.write_bytes(CONTENT[::-1])  # same size, different bytes
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    ok, message = registry.verify("mine")
    assert not ok and "SHA-256" in message


def test_rewritten_bytes_with_restored_mtime_are_rehashed_and_refused(home, weights):
    """Issue 22 item 3: same size, restored mtime, different bytes must not pass the memo."""
    registry.add("mine", weights, CONTENT_SHA)
    registry.resolve_weights(registry.get("mine"))  # memo recorded
    time.sleep(0.05)  # file times tick in jiffies (1-10 ms): the rewrite must land in a later tick
    stat = weights.stat()
    weights.write_bytes(CONTENT[::-1])
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    with pytest.raises(CheckpointError) as info:
        registry.resolve_weights(registry.get("mine"))
    message = str(info.value)
    assert f"but {CONTENT_SHA} was registered" in message and "\n" not in message


def test_another_file_moved_onto_the_path_is_rehashed(home, weights, tmp_path):
    registry.add("mine", weights, CONTENT_SHA)
    stat = weights.stat()
    other = tmp_path / "other.bin"
    other.write_bytes(CONTENT[::-1])
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(other, weights)
    with pytest.raises(CheckpointError, match="was registered"):
        registry.resolve_weights(registry.get("mine"))


def test_verify_unregistered_builtin(home):
    ok, message = registry.verify("brgsa")
    assert not ok and "medalign models add brgsa" in message


# ----------------------------------------------------------------- offline mode


def test_offline_never_opens_a_socket(home, no_sockets, monkeypatch):
    registry.add("remote", "http://127.0.0.1:9/weights/model.bin", CONTENT_SHA, family="ct-clip")
    monkeypatch.setenv("MEDALIGN_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        registry.resolve_weights(registry.get("remote"))
    assert "MEDALIGN_OFFLINE=1" in str(info.value) and "medalign models download remote" in str(info.value)

    monkeypatch.delenv("MEDALIGN_OFFLINE")
    with pytest.raises(CheckpointError, match="not downloaded"):
        registry.resolve_weights(registry.get("remote"), allow_download=False)


def test_offline_uses_a_verified_cached_download(home, no_sockets, monkeypatch):
    registry.add("remote", "https://example.org/files/model.bin?download=1", CONTENT_SHA)
    cached = home / "weights" / "remote" / "model.bin"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(CONTENT)
    monkeypatch.setenv("MEDALIGN_OFFLINE", "1")
    assert registry.weights_status(registry.get("remote")) == "downloaded"
    assert registry.resolve_weights(registry.get("remote")) == cached
    assert registry.verify("remote")[0]


def test_corrupt_cached_download_is_dropped(home, no_sockets, monkeypatch):
    registry.add("remote", "https://example.org/model.bin", CONTENT_SHA)
    cached = home / "weights" / "remote" / "model.bin"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    monkeypatch.setenv("MEDALIGN_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="MEDALIGN_OFFLINE"):
        registry.resolve_weights(registry.get("remote"))
    assert not cached.exists()


def test_weights_status_words(home, weights, fake_resources):
    registry.add("mine", weights, CONTENT_SHA)
    registry.add("remote", "https://example.org/model.bin", CONTENT_SHA)
    status = {e.name: registry.weights_status(e) for e in registry.list_models()}
    assert status == {
        "medalign-demo": "missing",
        "brgsa": "unset",
        "colipri": "not downloaded",
        "ct-clip": "not downloaded",
        "merlin": "not downloaded",
        "mine": "local",
        "remote": "not downloaded",
    }


def test_embedded_demo_model_carries_its_calibration():
    """The shipped demo file holds a threshold and a held-out AUC for every finding it was
    trained on, so near-chance findings are never flagged out of the box."""
    from medalign.models.medalign_model import read_checkpoint

    path = registry.resources_dir() / "models" / "medalign-demo" / "model.safetensors"
    _, _, extra = read_checkpoint(path)
    trained = set(extra["trained_findings"])
    assert set(extra["thresholds"]) == set(extra["validation_auc"]) == trained
    assert all(0.0 <= v <= 1.0 for v in extra["validation_auc"].values())


# ----------------------------------------------------------------- families


def test_one_family_list():
    """Registry entries (``models add --family``) and model building read the same family
    list; it was written twice, so a family added to one was unknown to the other."""
    from medalign import models

    assert models.FAMILY_LOADERS is registry.FAMILY_LOADERS
    assert registry.FAMILIES == tuple(registry.FAMILY_LOADERS) == ("medalign", "brgsa", "ct-clip", "colipri", "merlin")


def test_a_stored_calibration_wins_over_the_checkpoints_for_that_finding_only(tmp_path, monkeypatch):
    """Calibration fitted on a user's data is kept per model and applied by every later load."""
    from medalign.models import load, registry
    from medalign.models.calibration import Calibration, FindingCalibration

    monkeypatch.setenv("MEDALIGN_HOME", str(tmp_path))
    shipped = load("medalign-demo").calibration
    registry.save_calibration("medalign-demo", Calibration({"Emphysema": FindingCalibration(0.3, 0.8, 1.7)}, "my cohort"))
    model = load("medalign-demo")
    assert model.calibration.of("Emphysema") == FindingCalibration(0.3, 0.8, 1.7)
    assert model.calibration.of("Lung nodule") == shipped.of("Lung nodule")
    assert model.calibration.fitted_on == "my cohort"
    (tmp_path / "calibration" / "medalign-demo.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="calibration file .* is unreadable"):
        load("medalign-demo")
