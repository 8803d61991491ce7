"""Weights from the Hugging Face Hub: pinned, hash-checked, resumable across processes.

``huggingface_hub`` does what it does well here: the endpoint (``HF_ENDPOINT``), offline
mode (``HF_HUB_OFFLINE``), the token of a gated repository (``HF_TOKEN`` or ``hf auth
login``), URLs, the file metadata (commit, LFS SHA-256, size, CDN location) and the cache
layout, so a file fetched here is found by every other Hub tool and vice versa.

The transfer itself is ``models.download`` (HTTP Range into ``<blob>.part``): since
huggingface_hub 1.x a download goes to a process-unique temporary file that is deleted
on failure (file_download.py ``_download_to_tmp_and_move``, PR #4228), so a killed
transfer of a multi-gigabyte checkpoint would start again from byte zero.

A spec that names no commit or hash is pinned on first download (trust on first use):
the commit the branch resolved to and each file's SHA-256 (the Hub's LFS hash, checked
against the bytes) go to ``cache_dir()/hub-pins.json``, and later runs use exactly those.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

from medalign.core.atomic import write_json
from medalign.core.errors import CheckpointError
from medalign.models.download import ProgressFn
from medalign.models.spec import HubFiles

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_PINS_FILE = "hub-pins.json"
_NETWORK_MODULES = ("httpx", "httpx2", "httpcore", "huggingface_hub")  # huggingface_hub 2.x speaks httpx2


def _offline() -> bool:
    """The registry's MEDALIGN_OFFLINE switch, or the Hub's own HF_HUB_OFFLINE."""
    from huggingface_hub import constants

    from medalign.models.registry import downloads_disabled

    hub = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return downloads_disabled() or hub or bool(constants.HF_HUB_OFFLINE)


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _cache_root() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def _repo_folder(hub: HubFiles) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return _cache_root() / repo_folder_name(repo_id=hub.repo_id, repo_type=hub.repo_type)


# --------------------------------------------------------------------------- pins


def _pins_path() -> Path:
    from medalign.models.registry import cache_dir

    return cache_dir() / _PINS_FILE


def _key(hub: HubFiles) -> str:
    return f"{hub.repo_type}/{hub.repo_id}@{hub.revision}"


def _pins() -> dict:
    try:
        data = json.loads(_pins_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def pinned(hub: HubFiles) -> tuple[str, dict[str, str]]:
    """(commit, {file: sha256}) to use: the spec's own pins, completed by the local ones."""
    local = _pins().get(_key(hub), {})
    commit = hub.revision if hub.pinned else str(local.get("commit") or "")
    return commit, {**dict(local.get("sha256") or {}), **hub.sha256}


def _pin(hub: HubFiles, commit: str, filename: str, sha: str) -> None:
    pins = _pins()
    row = pins.setdefault(_key(hub), {"commit": commit, "sha256": {}})
    row["commit"] = row.get("commit") or commit
    row.setdefault("sha256", {})[filename] = sha
    write_json(_pins_path(), pins, sort_keys=True)


# --------------------------------------------------------------------------- lookup


def cached_file(hub: HubFiles, filename: str) -> Path | None:
    """The file from the Hub cache at the pinned commit, without network or hashing."""
    commit, _ = pinned(hub)
    if not commit:
        return None
    path = _repo_folder(hub) / "snapshots" / commit / filename
    return path if path.is_file() else None


def is_downloaded(hub: HubFiles) -> bool:
    return all(cached_file(hub, f) is not None for f in hub.files)


# --------------------------------------------------------------------------- fetch


def _by_hand(hub: HubFiles, filename: str, model: str) -> str:
    page = f"{_endpoint()}/{'datasets/' if hub.repo_type == 'dataset' else ''}{hub.repo_id}"
    return (
        f"download {filename} from {page} on a machine with access and register it with "
        f"'medalign models add {model} --weights PATH --sha256 HEX', or copy a Hub cache that holds it "
        f"into {_cache_root()}"
    )


def _metadata(hub: HubFiles, filename: str, revision: str, token: str | None, model: str):
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(hub.repo_id, filename, repo_type=hub.repo_type, revision=revision, endpoint=_endpoint())
    try:
        return get_hf_file_metadata(url, token=token, endpoint=_endpoint())
    except hf_errors.GatedRepoError:
        raise CheckpointError(
            f"{hub.repo_id} is a gated repository: accept its terms on {_endpoint()}/{hub.repo_id} and log in "
            "('hf auth login' or the HF_TOKEN environment variable), then run the same command again."
        ) from None
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError, hf_errors.EntryNotFoundError) as exc:
        raise CheckpointError(
            f"{filename} at revision {revision} of {hub.repo_id} was not found on {_endpoint()} ({type(exc).__name__})."
        ) from None
    except hf_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        raise CheckpointError(
            f"The Hub answered HTTP {status} for {filename} of {hub.repo_id}; {_by_hand(hub, filename, model)}."
        ) from None
    except Exception as exc:  # connection refused, proxy, timeout, offline mode: one sentence, not a traceback
        if not isinstance(exc, OSError) and type(exc).__module__.split(".")[0] not in _NETWORK_MODULES:
            raise
        raise CheckpointError(
            f"Cannot reach {_endpoint()} to download {filename} of {hub.repo_id} ({type(exc).__name__}: {exc}); "
            f"if this machine is offline or behind a proxy (set HTTPS_PROXY), {_by_hand(hub, filename, model)}."
        ) from None


def _link_snapshot(hub: HubFiles, commit: str, revision: str, filename: str, blob: Path) -> Path:
    """The Hub cache layout: snapshots/<commit>/<file> -> ../../blobs/<etag>, refs/<branch>."""
    target = _repo_folder(hub) / "snapshots" / commit / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    try:
        target.symlink_to(os.path.relpath(blob, target.parent))
    except OSError:  # no symlinks (Windows without developer mode): a copy, as huggingface_hub does
        shutil.copyfile(blob, target)
    if revision != commit:
        refs = _repo_folder(hub) / "refs" / revision
        refs.parent.mkdir(parents=True, exist_ok=True)
        refs.write_text(commit, encoding="utf-8")
    return target


def fetch_file(hub: HubFiles, filename: str, model: str, progress: bool | ProgressFn = True) -> Path:
    """One file of ``hub`` in the local Hub cache, verified; downloads it if needed and allowed."""
    from medalign.models.download import download, sha256_file

    commit, shas = pinned(hub)
    cached = cached_file(hub, filename)
    if cached is not None and filename in shas:
        from medalign.models.registry import check_file_sha

        return check_file_sha(cached, shas[filename], f"{hub.repo_id}/{filename}")
    if _offline():
        raise CheckpointError(
            f"{filename} of {hub.repo_id} is not downloaded and downloads are off (HF_HUB_OFFLINE or MEDALIGN_OFFLINE); "
            f"run 'medalign models download {model}' where {_endpoint()} is reachable, or {_by_hand(hub, filename, model)}."
        )
    from huggingface_hub import get_token

    token = get_token()
    revision = commit or hub.revision
    meta = _metadata(hub, filename, revision, token, model)
    commit = commit or str(meta.commit_hash or "")
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise CheckpointError(f"The Hub did not say which commit {hub.repo_id}@{revision} is; cannot pin {filename}.")
    etag = str(meta.etag or "")
    expected = shas.get(filename) or (etag if _SHA256_RE.match(etag) else None)
    blob = _repo_folder(hub) / "blobs" / (expected or etag or filename.replace("/", "_"))
    location = str(meta.location)
    same_host = urlparse(location).netloc == urlparse(_endpoint()).netloc
    headers = {"Authorization": f"Bearer {token}"} if token and same_host else {}
    download(location, blob, expected, progress=progress, headers=headers, label=filename)
    sha = expected or sha256_file(blob)
    _pin(hub, commit, filename, sha)
    return _link_snapshot(hub, commit, revision, filename, blob)


def fetch_folder(hub: HubFiles, model: str, progress: bool | ProgressFn = True) -> Path:
    """Every file of ``hub`` in one snapshot folder (a text encoder's folder)."""
    for filename in hub.files:
        fetch_file(hub, filename, model, progress)
    return _repo_folder(hub) / "snapshots" / pinned(hub)[0]


__all__ = ["cached_file", "fetch_file", "fetch_folder", "is_downloaded", "pinned"]
