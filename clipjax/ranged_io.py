"""Reading part of a file: positioned reads (one ranged GET each on an object store)
and one-pass reads in large blocks, for any path of `clipjax.paths`.

A webdataset sample is a few KiB inside a shard of hundreds of MiB: fsspec's default
readahead file would fetch a whole block (MiBs) to serve it. `RangeReader` asks for
exactly the bytes wanted; `open_sequential` reads a shard front to back (its tar
headers) in `block_size` requests with no metadata request when the size is known.
"""

from __future__ import annotations

import io
import os
from typing import IO

from clipjax import paths


class RangeReader:
    """Positioned reads of one file, each exactly the bytes asked for.

    Locally `os.pread` on one descriptor (thread-safe, no seek). Remotely each read is
    one ranged GET (`fs.cat_file(key, start, end)`): no readahead buffer, which would
    download a whole block (MiBs) to serve a sample of a few KiB.
    """

    def __init__(self, path: paths.PathLike):
        self.path = paths.canonical(path)
        self._local = None if paths.is_remote(self.path) else self.path
        self._fd: int | None = None
        if self._local is not None:
            self._fd = os.open(self._local, os.O_RDONLY)
        else:
            self._fs, self._key = paths.fsspec_fs(self.path)

    def read(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        if self._local is not None:
            if self._fd is None:
                raise ValueError(f"{self.path}: read from a closed RangeReader")
            return os.pread(self._fd, size, offset)
        return self._fs.cat_file(self._key, start=offset, end=offset + size)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_ranges(path: paths.PathLike) -> RangeReader:
    return RangeReader(path)


def open_sequential(path: paths.PathLike, block_size: int = 16 << 20,
                    size: int | None = None) -> IO[bytes]:
    """A binary file for one front-to-back pass (e.g. reading a tar's headers): remotely
    a readahead file fetching `block_size` bytes per request (`size`, when known, saves
    the metadata requests of opening it); locally a plain file."""
    s = paths.canonical(path)
    if not paths.is_remote(s):
        return open(s, "rb")
    if size is not None and size >= 0:
        return _BlockFile(RangeReader(s), int(size), block_size)
    fs, key = paths.fsspec_fs(s)
    return fs.open(key, "rb", block_size=block_size, cache_type="readahead")


class _BlockFile(io.RawIOBase):
    """A read-only file over ranged reads of `block_size` bytes: a forward pass costs
    ceil(size / block_size) GETs and no metadata request (the size is known)."""

    def __init__(self, ranges: RangeReader, size: int, block_size: int):
        super().__init__()
        self._ranges, self._size, self._block = ranges, size, max(1, int(block_size))
        self._pos, self._start, self._buf = 0, 0, b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + int(offset))
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        out = []
        while self._pos < end:
            if not self._start <= self._pos < self._start + len(self._buf):
                self._start = self._pos
                self._buf = self._ranges.read(self._pos, min(self._block, self._size - self._pos))
                if not self._buf:
                    break
            lo = self._pos - self._start
            chunk = self._buf[lo:lo + end - self._pos]
            out.append(chunk)
            self._pos += len(chunk)
        return b"".join(out)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._ranges.close()
        super().close()
