"""TensorBoard event files anywhere the path layer reaches: local, or `gs://` (any
fsspec protocol) without google-cloud-storage.

tensorboardX picks a record writer by the logdir's protocol. For remote logdirs
clipjax registers one that keeps the event file's bytes in memory and uploads the
file whole at every flush (an object store has no append), through
`clipjax.paths`. A file rolls over to a numbered sibling (`…tfevents….host.0001`)
once it passes ROLL_BYTES, so an upload stays bounded however long the run;
TensorBoard reads every file with "tfevents" in its name, in name order.
"""

from __future__ import annotations

import io
import sys

from clipjax import paths

ROLL_BYTES = 8 << 20


class _ObjectRecordWriter:
    """tensorboardX's record-writer interface (write / flush / close) over whole uploads."""

    def __init__(self, path: str):
        self.base, self.part = path, 0
        self.buffer = io.BytesIO()
        self.dirty = False

    def _name(self) -> str:
        return self.base if self.part == 0 else f"{self.base}.{self.part:04d}"

    def write(self, data: bytes) -> None:
        self.buffer.write(data)
        self.dirty = True

    def flush(self) -> None:
        if not self.dirty:
            return
        paths.write_bytes(self._name(), self.buffer.getvalue())
        self.dirty = False
        if self.buffer.tell() >= ROLL_BYTES:
            self.part += 1
            self.buffer = io.BytesIO()

    def close(self) -> None:
        self.flush()


class _ObjectWriterFactory:
    def open(self, path: str) -> _ObjectRecordWriter:
        return _ObjectRecordWriter(path)

    def directory_check(self, path: str) -> None:  # object stores have no directories
        pass


def _tensorboardx():
    """tensorboardX's writer, imported without torch: its `writer` module imports torch
    (when installed) only to accept torch tensors, which clipjax never logs, and that
    import costs 1.4-2.7 s at every start of a run on a machine with torch."""
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # `import torch` raises ImportError: tensorboardX's fallback
    try:
        from tensorboardX import SummaryWriter, record_writer
    finally:
        if blocked and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter, record_writer


def summary_writer(logdir: str, *, purge_step: int | None = None):
    """A tensorboardX SummaryWriter on `logdir` (relative, absolute or a URI).

    `purge_step` (a resumed run) makes TensorBoard drop the events past it."""
    SummaryWriter, record_writer = _tensorboardx()
    logdir = paths.to_str(logdir)
    proto = paths.protocol(logdir)
    if proto:
        record_writer.register_writer_factory(proto, _ObjectWriterFactory())
    else:
        paths.makedirs(logdir)
    return SummaryWriter(logdir, purge_step=purge_step or None)
