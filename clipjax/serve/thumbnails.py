"""Thumbnails and files of the indexed images, and of nothing else.

A file is named by its row in the index, never by a path, so no request can
name another file. A row's file is served only when its real location (symlinks
resolved) is a regular file in a directory that held indexed files when the
server started: a symlink that points out of the collection is refused, as is
a file swapped for one since. Each thumbnail is made once (with the data
pipeline's decompression-bomb guard), kept in memory (LRU) and, when a
directory is given, on disk keyed by path, size and mtime.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

from clipjax import imageio


class Thumbnails:
    def __init__(self, paths: Sequence[str], *, size: int = 256, directory: str | None = None,
                 max_pixels: int = 89_478_485, memory_items: int = 4096):
        self.paths = paths
        self.size = int(size)
        self.directory = directory
        self.max_pixels = max_pixels
        self.memory_items = memory_items
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.made = 0  # thumbnails made (not served from a cache): for tests and /api/info
        folders = {os.path.dirname(p) for p in paths}
        self._roots = frozenset(os.path.realpath(f) for f in folders)

    def file(self, row: int) -> str | None:
        """The real path of row `row`'s file, or None (no such row, gone, or outside)."""
        if not 0 <= row < len(self.paths):
            return None
        real = os.path.realpath(self.paths[row])
        if os.path.dirname(real) not in self._roots or not os.path.isfile(real):
            return None
        return real

    def get(self, row: int) -> bytes | None:
        """JPEG bytes of row `row`'s thumbnail, or None when it cannot be served."""
        real = self.file(row)
        if real is None:
            return None
        try:
            st = os.stat(real)
        except OSError:
            return None
        key = hashlib.sha256(
            f"{real}|{st.st_size}|{st.st_mtime_ns}|{self.size}".encode()).hexdigest()
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        data = self._read_disk(key)
        if data is None:
            data = self._make(real)
            if data is None:
                return None
            self._write_disk(key, data)
        with self._lock:
            self._memory[key] = data
            while len(self._memory) > self.memory_items:
                self._memory.popitem(last=False)
        return data

    def _make(self, path: str) -> bytes | None:
        try:
            with open(path, "rb") as f:
                raw = f.read()
            # JPEG decodes at a reduced scale; upright by EXIF, RGB.
            image = imageio.load(imageio.open_bytes(raw, max_pixels=self.max_pixels),
                                 exif_transpose=True, draft_size=(self.size, self.size))
            image.thumbnail((self.size, self.size))
            out = io.BytesIO()
            image.save(out, "JPEG", quality=85)
        except Exception:  # noqa: BLE001 - PIL raises assorted types on damaged files
            return None
        with self._lock:
            self.made += 1
        return out.getvalue()

    def _disk_path(self, key: str) -> str | None:
        return os.path.join(self.directory, key[:2], key + ".jpg") if self.directory else None

    def _read_disk(self, key: str) -> bytes | None:
        path = self._disk_path(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except (OSError, TypeError):
            return None

    def _write_disk(self, key: str, data: bytes) -> None:
        path = self._disk_path(key)
        if path is None:
            return
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:  # a read-only index still serves; thumbnails stay in memory
            pass
