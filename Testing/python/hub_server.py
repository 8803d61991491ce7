"""A Hugging Face Hub stand-in on 127.0.0.1 that serves the Hub's URL layout.

``huggingface_hub`` talks to it unchanged through ``HF_ENDPOINT``: ``HEAD/GET
/{repo}/resolve/{revision}/{path}`` (``/datasets/{repo}/…`` for datasets) answer with the
headers the real Hub sends — ``X-Repo-Commit``, ``ETag``, and for LFS files a redirect to a
CDN host with ``X-Linked-Etag`` (the SHA-256) and ``X-Linked-Size`` — and errors carry
``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo). The "CDN" is
the same server under the host name ``localhost`` (a different host to the client, so
a token must not travel there); it honours Range requests and can be throttled so a
test can kill a client mid-transfer.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

LFS_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth")


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    gated_token: str | None = None  # a token the repository demands, like a gated one
    wrong_bytes: set[str] = field(default_factory=set)  # files whose CDN bytes differ from their hash


@dataclass
class HubState:
    repos: dict[str, Repo] = field(default_factory=dict)  # "model/org/name" or "dataset/org/name"
    bytes_per_second: float | None = None
    requests: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


_RESOLVE = re.compile(r"^/(?:(?P<kind>datasets)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def _handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def _record(self) -> None:
            with state.lock:
                state.requests.append({
                    "method": self.command, "path": unquote(self.path), "host": self.headers.get("Host", ""),
                    "range": self.headers.get("Range"), "authorization": self.headers.get("Authorization"),
                })

        def _error(self, status: int, code: str | None = None) -> None:
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            self._record()
            path = unquote(self.path.split("?")[0])
            if path.startswith("/cdn/"):
                return self._cdn(path[len("/cdn/"):], body)
            match = _RESOLVE.match(path)
            if not match:
                return self._error(404)
            key = f"{'dataset' if match['kind'] else 'model'}/{match['repo']}"
            repo = state.repos.get(key)
            if repo is None:
                return self._error(401, "RepoNotFound")
            if repo.gated_token and self.headers.get("Authorization") != f"Bearer {repo.gated_token}":
                return self._error(403, "GatedRepo")
            if match["rev"] not in ("main", repo.commit):
                return self._error(404, "RevisionNotFound")
            data = repo.files.get(match["path"])
            if data is None:
                return self._error(404, "EntryNotFound")
            if match["path"].endswith(LFS_SUFFIXES):
                sha = _sha256(data)
                port = self.server.server_address[1]
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{port}/cdn/{key}/{sha}/{match['path']}")
                self.send_header("X-Repo-Commit", repo.commit)
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("ETag", f'"{_git_sha1(data)}"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            self.send_response(200)
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{_git_sha1(data)}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)
            return None

        def _cdn(self, rest: str, body: bool) -> None:
            kind, org, name, sha, filename = rest.split("/", 4)
            repo = state.repos.get(f"{kind}/{org}/{name}")
            data = repo.files.get(filename) if repo else None
            if data is None or _sha256(data) != sha:
                return self._error(404)
            if filename in repo.wrong_bytes:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            start = 0
            wanted = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
            if wanted and int(wanted.group(1)) < len(data):
                start = int(wanted.group(1))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if body:
                self._send_slowly(data[start:])
            return None

        def _send_slowly(self, data: bytes) -> None:
            chunk = 16384
            for at in range(0, len(data), chunk):
                try:
                    self.wfile.write(data[at : at + chunk])
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return
                if state.bytes_per_second:
                    time.sleep(chunk / state.bytes_per_second)

    return Handler


class LocalHub:
    """``with LocalHub() as hub: hub.add("model/org/name", {...}); os.environ["HF_ENDPOINT"] = hub.endpoint``."""

    def __init__(self) -> None:
        self.state = HubState()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, key: str, files: dict[str, bytes], **options) -> Repo:
        repo = Repo(files=files, **options)
        self.state.repos[key] = repo
        return repo

    def requests_for(self, fragment: str) -> list[dict]:
        with self.state.lock:
            return [r for r in self.state.requests if fragment in r["path"]]

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
