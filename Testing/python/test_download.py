"""Downloads against a real HTTP server on 127.0.0.1: full, resumed, refused, interrupted,
and the ``medalign models`` CLI end to end on top of them."""

from __future__ import annotations

import hashlib
import random
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from medalign.cli import main
from medalign.core.errors import CheckpointError
from medalign.models import registry
from medalign.models.download import download, sha256_file

PAYLOAD = random.Random(1234).randbytes(6 * 1024 + 123)  # a few KB, not a multiple of any chunk
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
WRONG_SHA = "0" * 64


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    honour_range: bool = True
    drop_after: int | None = None  # send the full Content-Length, then hang up after N bytes
    requests: list[tuple[str, str | None]] = field(default_factory=list)


def _handler(state: ServerState):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_GET(self):
            state.requests.append((self.path, self.headers.get("Range")))
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404, "Not Found")
                return
            start = 0
            range_header = self.headers.get("Range")
            if state.honour_range and range_header and range_header.startswith("bytes="):
                start = int(range_header[len("bytes="):].split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            chunk = body[start:]
            self.send_header("Content-Length", str(len(chunk)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if state.drop_after is not None:
                self.wfile.write(chunk[: state.drop_after])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(chunk)

    return Handler


@pytest.fixture
def server():
    state = ServerState(files={"/weights/model.bin": PAYLOAD})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"  # type: ignore[attr-defined]
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MEDALIGN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEDALIGN_OFFLINE", raising=False)
    return tmp_path / "home"


def _part(dest: Path) -> Path:
    return dest.with_suffix(dest.suffix + ".part")


def test_full_download_verifies_and_renames(server, tmp_path):
    dest = tmp_path / "out" / "model.bin"
    result = download(server.base + "/weights/model.bin", dest, PAYLOAD_SHA, progress=False)
    assert result == dest
    assert dest.read_bytes() == PAYLOAD
    assert not _part(dest).exists()
    assert sha256_file(dest) == PAYLOAD_SHA
    assert server.requests == [("/weights/model.bin", None)]


def test_existing_verified_file_is_not_fetched_again(server, tmp_path):
    dest = tmp_path / "model.bin"
    dest.write_bytes(PAYLOAD)
    download(server.base + "/weights/model.bin", dest, PAYLOAD_SHA, progress=False)
    assert server.requests == []


def test_hash_mismatch_is_refused_and_leaves_nothing(server, tmp_path):
    dest = tmp_path / "model.bin"
    with pytest.raises(CheckpointError) as info:
        download(server.base + "/weights/model.bin", dest, WRONG_SHA, progress=False)
    message = str(info.value)
    assert WRONG_SHA in message and PAYLOAD_SHA in message
    assert "\n" not in message
    assert not dest.exists() and not _part(dest).exists()


def test_resume_from_partial_file_uses_range(server, tmp_path):
    dest = tmp_path / "model.bin"
    _part(dest).write_bytes(PAYLOAD[:2500])
    download(server.base + "/weights/model.bin", dest, PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/weights/model.bin", "bytes=2500-")]
    assert not _part(dest).exists()


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.honour_range = False
    dest = tmp_path / "model.bin"
    _part(dest).write_bytes(b"x" * 1000)  # would corrupt the result if appended to
    download(server.base + "/weights/model.bin", dest, PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 1


def test_stale_partial_is_detected_and_redownloaded(server, tmp_path):
    dest = tmp_path / "model.bin"
    _part(dest).write_bytes(b"\0" * 2000)  # right size class, wrong bytes (an older upload)
    download(server.base + "/weights/model.bin", dest, PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert [r[1] for r in server.requests] == ["bytes=2000-", None]


def test_complete_partial_with_416_is_accepted(server, tmp_path):
    dest = tmp_path / "model.bin"
    _part(dest).write_bytes(PAYLOAD)
    download(server.base + "/weights/model.bin", dest, PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/weights/model.bin", f"bytes={len(PAYLOAD)}-")]


def test_dropped_connection_keeps_part_and_resumes(server, tmp_path):
    dest = tmp_path / "model.bin"
    url = server.base + "/weights/model.bin"
    server.drop_after = 3000
    with pytest.raises(CheckpointError) as info:
        download(url, dest, PAYLOAD_SHA, progress=False)
    message = str(info.value)
    assert "resume" in message and url in message and "\n" not in message
    assert not dest.exists()
    assert _part(dest).read_bytes() == PAYLOAD[:3000]

    server.drop_after = None
    download(url, dest, PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/weights/model.bin", "bytes=3000-")


def test_http_404_is_one_clear_sentence(server, tmp_path):
    dest = tmp_path / "model.bin"
    with pytest.raises(CheckpointError, match=r"HTTP 404") as info:
        download(server.base + "/nope.bin", dest, PAYLOAD_SHA, progress=False)
    assert "\n" not in str(info.value)
    assert not dest.exists() and not _part(dest).exists()


def test_connection_refused_is_one_clear_sentence(tmp_path):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with pytest.raises(CheckpointError, match=r"Cannot reach 127\.0\.0\.1"):
        download(f"http://127.0.0.1:{port}/m.bin", tmp_path / "m.bin", PAYLOAD_SHA, progress=False, timeout=5)


@pytest.mark.parametrize("url", ["ftp://example.org/m.bin", "s3://bucket/m.bin", "/plain/path/m.bin"])
def test_non_http_schemes_are_refused(url, tmp_path):
    with pytest.raises(CheckpointError, match="only http"):
        download(url, tmp_path / "m.bin", PAYLOAD_SHA, progress=False)


def test_file_url_is_copied_and_verified(tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(PAYLOAD)
    dest = tmp_path / "copy" / "m.bin"
    download(source.as_uri(), dest, PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    with pytest.raises(CheckpointError, match="SHA-256"):
        download(source.as_uri(), tmp_path / "bad.bin", WRONG_SHA, progress=False)
    assert not (tmp_path / "bad.bin").exists()


def test_concurrent_downloads_fetch_once(server, tmp_path):
    """torchrun ranks asking for the same weights must not interleave writes."""
    dest = tmp_path / "model.bin"
    errors: list[BaseException] = []

    def worker():
        try:
            download(server.base + "/weights/model.bin", dest, PAYLOAD_SHA, progress=False)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 1


# ----------------------------------------------------------------- registry over HTTP


def test_registry_downloads_url_once_then_works_offline(server, home, monkeypatch):
    registry.add("remote", server.base + "/weights/model.bin", PAYLOAD_SHA, family="brgsa")
    path = registry.resolve_weights(registry.get("remote"), progress=False)
    assert path == home / "weights" / "remote" / "model.bin"
    assert path.read_bytes() == PAYLOAD
    monkeypatch.setenv("MEDALIGN_OFFLINE", "1")
    assert registry.resolve_weights(registry.get("remote")) == path
    assert len(server.requests) == 1


def test_registry_url_with_wrong_hash_leaves_no_weights(server, home):
    registry.add("remote", server.base + "/weights/model.bin", WRONG_SHA)
    with pytest.raises(CheckpointError, match="SHA-256"):
        registry.resolve_weights(registry.get("remote"), progress=False)
    folder = home / "weights" / "remote"
    assert not (folder / "model.bin").exists() and not (folder / "model.bin.part").exists()


# ----------------------------------------------------------------- CLI end to end


def test_models_cli_add_list_download_verify_remove(server, home, capsys):
    url = server.base + "/weights/model.bin"
    assert main(["models", "add", "my-ct-clip", "--family", "ct-clip", "--weights", url, "--sha256", PAYLOAD_SHA.upper()]) == 0
    out = capsys.readouterr().out
    assert "Registered model 'my-ct-clip' (family ct-clip)" in out

    assert main(["models", "list"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("my-ct-clip"))
    assert "not downloaded" in line

    assert main(["models", "verify", "my-ct-clip"]) == 1
    assert "not downloaded" in capsys.readouterr().err

    assert main(["models", "download", "my-ct-clip", "--quiet"]) == 0
    out = capsys.readouterr().out
    cached = home / "weights" / "my-ct-clip" / "model.bin"
    assert str(cached) in out and cached.read_bytes() == PAYLOAD

    assert main(["models", "verify", "my-ct-clip"]) == 0
    assert PAYLOAD_SHA in capsys.readouterr().out

    assert main(["models", "show", "my-ct-clip"]) == 0
    shown = capsys.readouterr().out
    assert url in shown and "[downloaded]" in shown

    assert main(["models", "list"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("my-ct-clip"))
    assert "downloaded" in line and "not downloaded" not in line

    assert main(["models", "remove", "my-ct-clip"]) == 0
    capsys.readouterr()
    assert not cached.exists()
    assert "my-ct-clip" not in [e.name for e in registry.list_models()]
    assert len(server.requests) == 1


def test_models_cli_errors_are_one_line_exit_2(server, home, capsys):
    assert main(["models", "add", "x", "--weights", server.base + "/weights/model.bin", "--sha256", "abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medalign: error:") and "SHA-256" in err and "\n" not in err

    assert main(["models", "add", "y", "--weights", server.base + "/nope.bin", "--sha256", PAYLOAD_SHA]) == 0
    capsys.readouterr()
    assert main(["models", "download", "y", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "HTTP 404" in err and "\n" not in err

    assert main(["models", "show", "nonexistent"]) == 2
    assert "Unknown model 'nonexistent'" in capsys.readouterr().err
