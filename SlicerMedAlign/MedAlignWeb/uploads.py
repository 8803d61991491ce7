"""Uploaded files: size-limited, written only into a private folder, under a safe name.

Why here and not in the page: a browser can send anything (a huge file, a name like
``../../.bashrc``), so the server refuses a file over the limit before writing a byte,
keeps only the base name's volume suffix, and writes into a folder only its own user
can read (``tempfile.mkdtemp`` makes it 0700). The reading and the CT checks are the
engine's (``read_volume``, ``check_ct`` via ``ScreeningSession.load_path``), so an
upload is refused with the same sentence as ``medalign screen`` gives.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from medalign.core.errors import InputError

DEFAULT_MAX_UPLOAD_MB = 1024


def safe_name(name: str) -> str:
    """The base name of an uploaded file with only letters, digits and ``_.-`` kept: no
    folder part, no leading dot, so it can only ever name a file inside the upload folder.
    The suffix survives, so the engine's reader still knows (or refuses) the format."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(name)).name).lstrip(".")
    return base[-120:] or "upload"


class UploadFolder:
    """A private temporary folder for uploads, removed by ``close``."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_UPLOAD_MB * 1024 * 1024) -> None:
        self.max_bytes = int(max_bytes)
        self.path = Path(tempfile.mkdtemp(prefix="medalign-web-uploads-"))
        self._count = 0

    def save(self, name: str, content: bytes | list | None, size: int | None = None) -> Path:
        """Write one uploaded file and return its path, or raise ``InputError`` (too big or
        empty; whether it is a CT the engine's reader and checks decide)."""
        if isinstance(content, list):  # trame sends large files as a list of chunks
            content = b"".join(content)
        shown = Path(str(name or "upload")).name
        length = len(content) if content is not None else int(size or 0)
        if length > self.max_bytes or int(size or 0) > self.max_bytes:
            raise InputError(f"The upload '{shown}' is {max(length, int(size or 0)) / 2**20:.0f} MB; "
                             f"this viewer accepts files up to {self.max_bytes / 2**20:.0f} MB.")
        if not content:
            raise InputError(f"The upload '{shown}' is empty.")
        self._count += 1
        folder = self.path / f"{self._count:04d}"  # one folder per upload: names never collide
        folder.mkdir(mode=0o700)
        path = folder / safe_name(shown)
        path.write_bytes(content)
        path.chmod(0o600)
        return path

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
