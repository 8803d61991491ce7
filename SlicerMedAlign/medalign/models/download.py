"""Resumable, hash-verified downloads with the standard library only (no ``requests``).

Checkpoints are hundreds of megabytes and hospital networks drop connections, so a
transfer streams into ``<dest>.part``, resumes it with an HTTP Range request, and only
becomes ``<dest>`` (atomic rename) once its SHA-256 matches.  A file lock serialises
concurrent downloads of the same file (e.g. every ``torchrun`` rank asking for it).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

from filelock import FileLock  # a torch dependency, so always present

from medalign import __version__
from medalign.core.atomic import publish
from medalign.core.errors import CheckpointError

ProgressFn = Callable[[float, str], None]

_CHUNK = 1 << 20
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)


def sha256_file(path: Path, chunk: int = _CHUNK) -> str:
    """Hex SHA-256 of a file, read in chunks so memory stays flat for any size."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _progress_bar(total: int | None, initial: int, name: str, enabled: bool | ProgressFn):
    """A tqdm bar for people, or ``enabled(fraction, message)`` calls for a front end's bar."""
    if callable(enabled):
        return _ReportedBar(total, initial, name, enabled)
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=name,
        disable=not enabled,
        leave=False,
    )


class _ReportedBar:
    """The bar's ``update`` turned into ``(fraction, "name 12/345 MB")`` reports, at most
    one per percent so a pipe to the panel is not flooded."""

    def __init__(self, total: int | None, initial: int, name: str, report: ProgressFn) -> None:
        self.total, self.done, self.name, self.report, self._last = total, initial, name, report, -1

    def __enter__(self) -> _ReportedBar:
        self.update(0)
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int) -> None:
        self.done += n
        fraction = self.done / self.total if self.total else 0.0
        if int(fraction * 100) != self._last:
            self._last = int(fraction * 100)
            total = f"/{self.total / 1e6:.0f}" if self.total else ""
            self.report(min(1.0, fraction), f"{self.name} {self.done / 1e6:.0f}{total} MB")


def _finish(part: Path, dest: Path, digest: hashlib._Hash, sha256: str | None, url: str) -> Path:
    """Check the hash of the completed part and publish it under its final name."""
    if sha256 is not None:
        actual = digest.hexdigest()
        if actual != sha256.lower():
            part.unlink(missing_ok=True)
            raise CheckpointError(
                f"The file downloaded from {url} has SHA-256 {actual} but {sha256.lower()} was expected; "
                "it was deleted."
            )
    return publish(part, dest)


def _copy_file_url(url: str, dest: Path, part: Path, sha256: str | None, progress: bool | ProgressFn) -> Path:
    source = Path(unquote(urlparse(url).path))
    if not source.is_file():
        raise CheckpointError(f"Cannot download {url}: {source} does not exist.")
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(part, "wb") as out, _progress_bar(
        source.stat().st_size, 0, dest.name, progress
    ) as bar:
        while block := src.read(_CHUNK):
            out.write(block)
            digest.update(block)
            bar.update(len(block))
        out.flush()
        os.fsync(out.fileno())
    return _finish(part, dest, digest, sha256, url)


def _hash_existing(part: Path) -> hashlib._Hash:
    digest = hashlib.sha256()
    with open(part, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest


def _open(url: str, offset: int, timeout: float, extra_headers: dict[str, str] | None = None):
    headers = {"User-Agent": f"medalign/{__version__}", "Accept-Encoding": "identity", **(extra_headers or {})}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    return urllib.request.build_opener(_HttpOnlyRedirects).open(request, timeout=timeout)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects (mirrors, CDNs) but never off http(s), e.g. to ftp://."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401 (urllib hook)
        if urlparse(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http(s) URL {newurl}", headers, fp)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urlparse(newurl).netloc != urlparse(req.full_url).netloc:
            new.remove_header("Authorization")  # a Hub token never travels to a CDN or mirror
        return new


def _http_once(
    url: str, dest: Path, part: Path, sha256: str | None, progress: bool | ProgressFn, resume: bool, timeout: float, how: dict
) -> Path:
    host = urlparse(url).netloc
    offset = part.stat().st_size if (resume and part.is_file()) else 0
    if not resume:
        part.unlink(missing_ok=True)
    try:
        response = _open(url, offset, timeout, how.get("headers"))
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # The part already holds the whole file (or more): judge it by its hash.
            exc.close()
            digest = _hash_existing(part)
            if sha256 is not None and digest.hexdigest() == sha256.lower():
                return _finish(part, dest, digest, sha256, url)
            part.unlink(missing_ok=True)
            return _http_once(url, dest, part, sha256, progress, resume, timeout, how)
        raise CheckpointError(f"Download of {url} failed: HTTP {exc.code} {exc.reason}.") from None
    except urllib.error.URLError as exc:
        raise CheckpointError(f"Cannot reach {host} to download {url} ({exc.reason}).") from None
    except (OSError, http.client.HTTPException) as exc:
        raise CheckpointError(f"Cannot reach {host} to download {url} ({exc}).") from None

    with response:
        status = getattr(response, "status", 200)
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        if status == 206:
            match = _CONTENT_RANGE_RE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                # A range we did not ask for: start over rather than splice wrong bytes.
                response.close()
                part.unlink(missing_ok=True)
                return _http_once(url, dest, part, sha256, progress, False, timeout, how)
            digest = _hash_existing(part)
            mode = "ab"
        else:
            offset = 0  # 200: the server ignored Range (or there was none); restart cleanly
            digest = hashlib.sha256()
            mode = "wb"
        expected_total = offset + length if length is not None else None
        received = offset
        interrupted: BaseException | None = None
        try:
            with open(part, mode) as out, _progress_bar(expected_total, offset, how.get("label") or dest.name, progress) as bar:
                while True:
                    try:
                        block = response.read(_CHUNK)
                    except (OSError, http.client.HTTPException) as exc:  # reset, timeout, IncompleteRead
                        interrupted = exc
                        break
                    if not block:
                        break
                    out.write(block)
                    digest.update(block)
                    received += len(block)
                    bar.update(len(block))
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:  # disk full, permission denied: a local problem, not the network
            raise CheckpointError(f"Cannot write {part} while downloading {url} ({exc.strerror or exc}).") from None
    if interrupted is not None:
        raise CheckpointError(
            f"Download of {url} was interrupted after {received} bytes ({type(interrupted).__name__}); "
            "run the same command again to resume."
        )
    if expected_total is not None and received < expected_total:
        raise CheckpointError(
            f"Download of {url} stopped after {received} of {expected_total} bytes; "
            "run the same command again to resume."
        )
    return _finish(part, dest, digest, sha256, url)


def download(
    url: str,
    dest: Path,
    sha256: str | None,
    progress: bool | ProgressFn = True,
    resume: bool = True,
    timeout: float = 30,
    headers: dict[str, str] | None = None,
    label: str | None = None,
) -> Path:
    """Fetch ``url`` into ``dest`` (verified against ``sha256`` when given) and return ``dest``.

    An existing ``dest`` with the right hash is reused.  A failed transfer leaves
    ``dest.part`` for the next call to resume; a hash mismatch leaves nothing.
    ``headers`` go with every request (a Hub token); ``label`` names the progress bar.
    """
    how = {"headers": headers, "label": label}
    dest = Path(dest)
    scheme = urlparse(url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise CheckpointError(f"Refusing to download '{url}': only http(s) and file:// URLs are supported.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    with FileLock(str(dest) + ".lock"):
        if dest.is_file() and sha256 is not None and sha256_file(dest) == sha256.lower():
            return dest  # another process (or an earlier run) already finished it
        if scheme == "file":
            return _copy_file_url(url, dest, part, sha256, progress)
        resumed = resume and part.is_file() and part.stat().st_size > 0
        try:
            return _http_once(url, dest, part, sha256, progress, resume, timeout, how)
        except CheckpointError:
            if not resumed or part.exists():
                raise
            # The hash failed after resuming: the old part may be from an older upload.
            # One clean attempt from byte zero tells a stale part from a bad file.
            return _http_once(url, dest, part, sha256, progress, False, timeout, how)


__all__ = ["download", "sha256_file"]
