"""Model registry: which weights each model name means, and proof they are the right bytes.

Three models are built in (``medalign-demo`` ships inside the package; ``brgsa`` and
``ct-clip`` need user-supplied weights because their licences and sizes forbid bundling).
Users register weights with ``medalign models add``; those entries live in
``cache_dir()/registry.json`` so they survive upgrades of the package.  Every weight file
is checked against its SHA-256 before use; the result is memoised by path, size, mtime,
ctime, inode and device in ``cache_dir()/verified.json`` so a 700 MB checkpoint is hashed
once (about 2 s), not on every run; the 3 MB demo weights take about 30 ms.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from medalign.core.atomic import write_json
from medalign.core.errors import CheckpointError, InputError
from medalign.core.resources import resources_dir
from medalign.models.calibration import Calibration
from medalign.models.download import ProgressFn
from medalign.models.spec import HubFiles, ModelSpec, builtin_specs

DEFAULT_MODEL = "medalign-demo"

# The one list of model families: name -> "module:function" of its loader, each
# f(weights: Path, text_encoder: str | Path | None, device: str) -> ScreeningModel.
# Plain strings: ``medalign.models.family_loader`` imports a family's module only when
# one of its models is built, so a broken optional family never blocks the others.
FAMILY_LOADERS: dict[str, str] = {
    "medalign": "medalign.models.medalign_model:load_checkpoint",
    "brgsa": "medalign.models.brgsa:load_brgsa",
    "ct-clip": "medalign.models.ctclip:load_ctclip",
    "colipri": "medalign.models.colipri:load_colipri",
    "merlin": "medalign.models.merlin:load_merlin",
}
FAMILIES = tuple(FAMILY_LOADERS)

_REGISTRY_FILE = "registry.json"
_VERIFIED_FILE = "verified.json"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class ModelEntry:
    """One registry row; ``weights`` is a local path or an http(s)/file URL (None = unset)."""

    name: str
    family: str  # "medalign" | "brgsa" | "ct-clip"
    weights: str | None
    sha256: str | None
    text_encoder: str | None  # folder with a BERT-style model, or None for the family default
    card: Path | None  # MODEL_CARD.md, when one ships with the package
    description: str
    builtin: bool
    spec: ModelSpec | None = None  # the package's description of a built-in model

    @property
    def is_url(self) -> bool:
        return self.weights is not None and _is_url(self.weights)

    @property
    def hub_weights(self) -> HubFiles | None:
        """The Hub files this entry's weights come from (None once the user registered their own)."""
        if self.weights is not None or self.spec is None or self.spec.weights.kind != "hub":
            return None
        return self.spec.weights.hub

    @property
    def hub_text_encoder(self) -> HubFiles | None:
        if self.text_encoder is not None or self.spec is None or self.spec.text_encoder.kind != "hub":
            return None
        return self.spec.text_encoder.hub


# --------------------------------------------------------------------------- locations


def cache_dir() -> Path:
    """Per-user folder for the registry, verified hashes and downloads.

    ``$MEDALIGN_HOME`` wins so tests, clusters and Slicer installs can relocate it.
    """
    env = os.environ.get("MEDALIGN_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "medalign"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "medalign"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "medalign"


def _demo_weights() -> Path:
    spec = builtin_specs(resources_dir() / "models")[DEFAULT_MODEL]
    return spec.folder / (spec.weights.path or "model.safetensors")


def _bundled_sha(weights: Path) -> str | None:
    sha_file = weights.with_name(weights.name + ".sha256")
    if not sha_file.is_file():
        return None
    tokens = sha_file.read_text(encoding="utf-8").split()
    return tokens[0].lower() if tokens else None


def _entry_from_spec(spec: ModelSpec) -> ModelEntry:
    weights = sha = None
    if spec.weights.kind == "bundled":
        path = spec.folder / (spec.weights.path or "model.safetensors")
        weights, sha = str(path), _bundled_sha(path)
    return ModelEntry(
        name=spec.name,
        family=spec.family,
        weights=weights,
        sha256=sha,
        text_encoder=None,
        card=spec.card_path,
        description=spec.description,
        builtin=True,
        spec=spec,
    )


def _builtins() -> dict[str, ModelEntry]:
    return {name: _entry_from_spec(spec) for name, spec in builtin_specs(resources_dir() / "models").items()}


# --------------------------------------------------------------------------- user file


def _registry_path() -> Path:
    return cache_dir() / _REGISTRY_FILE


def _load_user() -> dict[str, dict]:
    path = _registry_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        models = data["models"]
        if not isinstance(models, dict):
            raise TypeError
        return models
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"The model registry {path} is corrupt ({type(exc).__name__}); fix or delete it and re-add your models."
        ) from None


def _save_user(models: dict[str, dict]) -> None:
    write_json(_registry_path(), {"version": 1, "models": models}, sort_keys=True)


def _entry_from_user(name: str, raw: dict, base: ModelEntry | None) -> ModelEntry:
    return ModelEntry(
        name=name,
        family=str(raw.get("family") or (base.family if base else "medalign")),
        weights=raw.get("weights"),
        sha256=(raw.get("sha256") or "").lower() or None,
        text_encoder=raw.get("text_encoder") or (base.text_encoder if base else None),
        card=base.card if base else None,
        description=str(raw.get("description") or (base.description if base else "")),
        builtin=base is not None,
        spec=base.spec if base else None,
    )


# --------------------------------------------------------------------------- queries


def list_models() -> list[ModelEntry]:
    """Builtins first (demo, then the others), then user entries by name."""
    builtins = _builtins()
    user = _load_user()
    entries = [
        _entry_from_user(name, user[name], entry) if name in user else entry for name, entry in builtins.items()
    ]
    entries += [_entry_from_user(name, user[name], None) for name in sorted(user) if name not in builtins]
    return entries


def get(name: str) -> ModelEntry:
    """The entry called ``name``; an unknown name lists the known ones."""
    for entry in list_models():
        if entry.name == name:
            return entry
    known = ", ".join(entry.name for entry in list_models())
    raise CheckpointError(f"Unknown model '{name}' (known: {known}).")


# --------------------------------------------------------------------------- changes


def _is_url(value: str) -> bool:
    return urlparse(value).scheme.lower() in ("http", "https", "file")


def _url_local_path(url: str) -> Path:
    return Path(unquote(urlparse(url).path))


def _normalise_sha(sha256: str) -> str:
    sha = (sha256 or "").strip().lower()
    if not _SHA256_RE.match(sha):
        raise InputError(f"'{sha256}' is not a SHA-256 hash (expected 64 hexadecimal characters).")
    return sha


def add(
    name: str,
    weights: str | os.PathLike,
    sha256: str,
    family: str | None = None,
    text_encoder: str | os.PathLike | None = None,
    description: str = "",
) -> ModelEntry:
    """Register (or re-register) weights under ``name``.

    A local file is hashed now, so a wrong hash is refused at once rather than at the
    first screening; URLs are checked when downloaded.
    """
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", name or ""):
        raise InputError(f"'{name}' is not a valid model name (use letters, digits, '.', '_' and '-').")
    if name == DEFAULT_MODEL:
        raise CheckpointError(f"'{DEFAULT_MODEL}' is the embedded demo model and cannot be replaced; pick another name.")
    base = _builtins().get(name)
    if family is None:
        family = base.family if base else "medalign"
    if family not in FAMILIES:
        raise InputError(f"Unknown model family '{family}' (known: {', '.join(FAMILIES)}).")
    if base is not None and family != base.family:
        raise InputError(f"Model '{name}' belongs to family '{base.family}', not '{family}'.")
    sha = _normalise_sha(sha256)

    weights_str = str(weights)
    if _is_url(weights_str) and urlparse(weights_str).scheme.lower() != "file":
        stored = weights_str
    else:
        local = _url_local_path(weights_str) if _is_url(weights_str) else Path(weights_str).expanduser()
        local = local.resolve()
        if not local.is_file():
            raise InputError(f"Weights file not found: {local}.")
        _check_local(local, sha, name)
        stored = str(local)

    encoder = None
    if text_encoder is not None:
        encoder_path = Path(text_encoder).expanduser().resolve()
        if not encoder_path.is_dir():
            raise InputError(f"Text encoder folder not found: {encoder_path}.")
        encoder = str(encoder_path)

    user = _load_user()
    if name in user and user[name].get("weights") != stored:
        shutil.rmtree(_download_dir(name), ignore_errors=True)  # a copy of the old URL is no use now
    user[name] = {
        "family": family,
        "weights": stored,
        "sha256": sha,
        "text_encoder": encoder,
        "description": description,
    }
    _save_user(user)
    return get(name)


def remove(name: str) -> None:
    """Forget a user registration and delete weights this registry downloaded for it.

    A user's own local weight file is never deleted.  Removing a builtin's
    registration returns it to "no weights registered".
    """
    user = _load_user()
    if name not in user:
        if name in _builtins():
            raise CheckpointError(f"Model '{name}' is built in and has no registration of yours to remove.")
        get(name)  # raises the 'Unknown model' sentence
    del user[name]
    _save_user(user)
    shutil.rmtree(_download_dir(name), ignore_errors=True)


# --------------------------------------------------------------------------- verification


def _verified_path() -> Path:
    return cache_dir() / _VERIFIED_FILE


def _load_verified() -> dict[str, dict]:
    try:
        data = json.loads(_verified_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # a lost memo only costs one re-hash


def _stat_key(path: Path) -> dict[str, int]:
    """What the memo trusts a file by.  Size and mtime alone are not enough: anyone who
    can write the file can also put its mtime back (``os.utime``).  The ctime cannot be
    set by a user: every write, and the ``utime`` call itself, moves it to "now".  The
    inode and device pin the very file, so a different file renamed onto the path is
    hashed again too."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino, "device": st.st_dev}


def _memo_sha(path: Path) -> str | None:
    """The hash recorded for ``path`` if the file is provably untouched since (see ``_stat_key``)."""
    record = _load_verified().get(str(path))
    if not isinstance(record, dict):
        return None
    key = _stat_key(path)
    if any(record.get(field) != value for field, value in key.items()):
        return None
    return record.get("sha256")


def _remember_sha(path: Path, sha: str) -> None:
    memo = _load_verified()
    memo[str(path)] = {**_stat_key(path), "sha256": sha}
    with contextlib.suppress(OSError):  # read-only cache: verification still happened, only the memo is lost
        write_json(_verified_path(), memo, sort_keys=True)


def _file_sha(path: Path, use_memo: bool = True) -> str:
    from medalign.models.download import sha256_file

    if use_memo:
        cached = _memo_sha(path)
        if cached:
            return cached
    sha = sha256_file(path)
    _remember_sha(path, sha)
    return sha


def _check_local(path: Path, expected: str, name: str, use_memo: bool = True) -> Path:
    actual = _file_sha(path, use_memo=use_memo)
    if actual != expected:
        raise CheckpointError(
            f"Weights {path} for model '{name}' have SHA-256 {actual} but {expected} was registered; "
            "the file is corrupt or not the registered one."
        )
    return path


def _download_dir(name: str) -> Path:
    return cache_dir() / "weights" / name


def _download_target(entry: ModelEntry) -> Path:
    filename = Path(unquote(urlparse(entry.weights or "").path)).name or "weights.bin"
    return _download_dir(entry.name) / filename


def downloads_disabled() -> bool:
    """MEDALIGN_OFFLINE=1: no download of any weights (registry URLs and the Hub alike)."""
    return os.environ.get("MEDALIGN_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _require_registration(entry: ModelEntry) -> None:
    if entry.name == DEFAULT_MODEL and entry.builtin:
        if not Path(entry.weights or "").is_file() or not entry.sha256:
            raise CheckpointError(
                f"The embedded demo model is missing from this installation ({_demo_weights()} "
                "or its .sha256 file is absent); reinstall medalign."
            )
        return
    if entry.hub_weights is not None:
        return
    if entry.weights is None:
        how = f" ({entry.spec.weights.how})" if entry.spec is not None and entry.spec.weights.how else ""
        raise CheckpointError(
            f"Model '{entry.name}' has no weights registered{how}; "
            f"run: medalign models add {entry.name} --weights PATH --sha256 HEX"
        )
    if not entry.sha256:
        raise CheckpointError(
            f"Model '{entry.name}' has no SHA-256 registered; "
            f"run: medalign models add {entry.name} --weights {entry.weights} --sha256 HEX"
        )


def resolve_weights(entry: ModelEntry, allow_download: bool | None = None, *, progress: bool | ProgressFn = True) -> Path:
    """A local, hash-verified weight file for ``entry``, downloading it if needed and allowed.

    ``allow_download=None`` means "unless MEDALIGN_OFFLINE=1": offline sites (hospitals,
    clusters without egress) get a clear sentence instead of a hanging socket.
    """
    _require_registration(entry)
    hub_files = entry.hub_weights
    if hub_files is not None:
        from medalign.models import hub

        if allow_download is False and hub.cached_file(hub_files, hub_files.files[0]) is None:
            raise CheckpointError(f"Weights for model '{entry.name}' are not downloaded; run: medalign models download {entry.name}")
        return hub.fetch_file(hub_files, hub_files.files[0], entry.name, progress=progress)
    assert entry.weights is not None and entry.sha256 is not None
    if not entry.is_url or urlparse(entry.weights).scheme.lower() == "file":
        path = _url_local_path(entry.weights) if entry.is_url else Path(entry.weights)
        if not path.is_file():
            raise CheckpointError(f"Weights file {path} for model '{entry.name}' does not exist.")
        return _check_local(path, entry.sha256, entry.name)

    target = _download_target(entry)
    if target.is_file():
        try:
            return _check_local(target, entry.sha256, entry.name)
        except CheckpointError:
            target.unlink(missing_ok=True)  # stale or damaged copy: fetch afresh below
    if allow_download is None:
        allow_download = not downloads_disabled()
    if not allow_download:
        raise CheckpointError(
            f"Weights for model '{entry.name}' are not downloaded and downloads are disabled "
            f"(MEDALIGN_OFFLINE=1); run 'medalign models download {entry.name}' where the network is reachable."
        )
    from medalign.models.download import download

    download(entry.weights, target, entry.sha256, progress=progress)
    _remember_sha(target, entry.sha256)
    return target


def weights_status(entry: ModelEntry) -> str:
    """A cheap one-word state for listings (no hashing): ready / not downloaded / missing / unset."""
    if entry.hub_weights is not None:
        from medalign.models import hub

        parts = [entry.hub_weights] + ([entry.hub_text_encoder] if entry.hub_text_encoder else [])
        return "downloaded" if all(hub.is_downloaded(h) for h in parts) else "not downloaded"
    if entry.weights is None or (entry.name == DEFAULT_MODEL and not entry.sha256):
        return "missing" if entry.name == DEFAULT_MODEL else "unset"
    if entry.is_url and urlparse(entry.weights).scheme.lower() != "file":
        return "downloaded" if _download_target(entry).is_file() else "not downloaded"
    path = _url_local_path(entry.weights) if entry.is_url else Path(entry.weights)
    return "local" if path.is_file() else "missing"


def verify(name: str) -> tuple[bool, str]:
    """Re-hash the weights of ``name`` now (ignoring the memo); never downloads."""
    entry = get(name)
    try:
        _require_registration(entry)
    except CheckpointError as exc:
        return False, str(exc)
    if entry.hub_weights is not None:
        return _verify_hub(entry)
    assert entry.weights is not None and entry.sha256 is not None
    if entry.is_url and urlparse(entry.weights).scheme.lower() != "file":
        path = _download_target(entry)
        if not path.is_file():
            return False, f"Weights for model '{name}' are not downloaded yet; run: medalign models download {name}"
    else:
        path = _url_local_path(entry.weights) if entry.is_url else Path(entry.weights)
        if not path.is_file():
            return False, f"Weights file {path} for model '{name}' does not exist."
    try:
        _check_local(path, entry.sha256, name, use_memo=False)
    except CheckpointError as exc:
        return False, str(exc)
    return True, f"Model '{name}': {path} matches SHA-256 {entry.sha256}."


def _calibration_path(name: str) -> Path:
    return cache_dir() / "calibration" / f"{name}.json"


def save_calibration(name: str, calibration: Calibration) -> Path:
    """Store a calibration fitted on the user's labelled data for model ``name``; every later
    ``models.load(name)`` applies it (over whatever the checkpoint itself carries)."""
    get(name)  # an unknown name is one sentence, not a stray file
    path = _calibration_path(name)
    write_json(path, {"version": 1, "model": name, **calibration.to_dict()}, sort_keys=True)
    return path


def load_calibration(name: str) -> Calibration | None:
    """The user's stored calibration for ``name``, or None; a corrupt file is one sentence."""
    path = _calibration_path(name)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("model") != name:
            raise ValueError("it names another model")
        return Calibration.from_dict(data)
    except (ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"The calibration file {path} is unreadable ({exc}); delete it or calibrate again.") from None


def _verify_hub(entry: ModelEntry) -> tuple[bool, str]:
    from medalign.models import hub

    checked = []
    for files in (entry.hub_weights, entry.hub_text_encoder):
        if files is None:
            continue
        _, shas = hub.pinned(files)
        for filename in files.files:
            path = hub.cached_file(files, filename)
            if path is None or filename not in shas:
                missing = f"{filename} of {files.repo_id} for model '{entry.name}' is not downloaded"
                return False, f"{missing}; run: medalign models download {entry.name}"
            try:
                check_file_sha(path, shas[filename], f"{files.repo_id}/{filename}", use_memo=False)
            except CheckpointError as exc:
                return False, str(exc)
            checked.append(filename)
    return True, f"Model '{entry.name}': {len(checked)} Hub files match their pinned SHA-256."


def check_file_sha(path: Path, expected: str, label: str, use_memo: bool = True) -> Path:
    """``path`` if its SHA-256 is ``expected`` (memoised, see ``_stat_key``), else one sentence."""
    return _check_local(path, expected, label, use_memo=use_memo)


def resolve_text_encoder(entry: ModelEntry, *, progress: bool | ProgressFn = True) -> str | Path | None:
    """The entry's text-encoder folder: the user's, the Hub snapshot (downloaded if needed),
    or None for the family's default."""
    if entry.text_encoder is not None:
        return entry.text_encoder
    files = entry.hub_text_encoder
    if files is None:
        return None
    from medalign.models import hub

    return hub.fetch_folder(files, entry.name, progress=progress)


def download_model(name: str, *, progress: bool | ProgressFn = True) -> list[Path]:
    """Fetch everything model ``name`` needs (weights, Hub text encoder); already-present files cost nothing."""
    entry = get(name)
    paths = [resolve_weights(entry, allow_download=True, progress=progress)]
    encoder = resolve_text_encoder(entry, progress=progress)
    return paths + ([Path(encoder)] if encoder is not None else [])


def default_findings(name: str) -> str:
    """The finding group a model screens when none are asked for (its spec's; CT-RATE otherwise)."""
    try:
        entry = get(name)
    except CheckpointError:
        return "ct-rate"
    return entry.spec.findings if entry.spec is not None else "ct-rate"


def entry_as_dict(entry: ModelEntry) -> dict:
    """JSON-friendly view (for ``medalign models list --json`` and reports)."""
    data = asdict(entry)
    data.pop("spec", None)
    data["card"] = str(entry.card) if entry.card else None
    spec = entry.spec
    data.update({
        "title": spec.title if spec else entry.name,
        "licence": spec.licence if spec else "user-supplied",
        "size_bytes": spec.size_bytes if spec else None,
        "trained_on": spec.trained_on if spec else "",
        "findings": spec.findings if spec else "ct-rate",
        "source": spec.weights.kind if spec and (entry.weights is None or spec.weights.kind == "bundled") else "user",
        "status": weights_status(entry),
    })
    return data


__all__ = [
    "DEFAULT_MODEL",
    "FAMILIES",
    "FAMILY_LOADERS",
    "ModelEntry",
    "add",
    "cache_dir",
    "check_file_sha",
    "default_findings",
    "download_model",
    "downloads_disabled",
    "entry_as_dict",
    "get",
    "list_models",
    "load_calibration",
    "save_calibration",
    "remove",
    "resolve_text_encoder",
    "resolve_weights",
    "resources_dir",
    "verify",
    "weights_status",
]
