"""An incremental on-disk cache of image embeddings: what `clipjax embed` writes
and `clipjax search` reads.

    INDEX_DIR/embeddings.npy   [N, D] float16 or float32, L2-normalised rows
    INDEX_DIR/files.json       paths (absolute), sizes and mtimes (ns) of the N rows
    INDEX_DIR/meta.json        model (workdir, step, fingerprint), dim, dtype, count,
                               revision, the files skipped as unreadable
    INDEX_DIR/<kind>.faiss     an approximate index built from this revision (optional)

Re-running `update` embeds only files that are new or whose size or mtime
changed, drops the rows of files that no longer exist, and keeps the rest
byte for byte. The model fingerprint (a hash of the model config and every
parameter) guards against mixing embeddings of two models in one cache.

INDEX_DIR may be relative, absolute or a URI (`gs://bucket/index`): the cache's
files go through `clipjax.paths` (each replaced whole: tmp + rename locally, one
object upload remotely). A local cache is memory-mapped; a remote one is read
into memory. The images themselves are local files.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipjax import paths as paths_lib
from clipjax.apps import image_files
from clipjax.errors import ClipjaxError

FORMAT = 1
EMBEDDINGS = "embeddings.npy"
FILES = "files.json"
META = "meta.json"
DTYPES = ("float16", "float32")


def model_fingerprint(model) -> str:
    """sha256 of the model section of the config and of every parameter (path, shape, bytes)."""
    import jax

    h = hashlib.sha256()
    h.update(model.config.model.to_json(sort_keys=True).encode())
    leaves = jax.tree_util.tree_flatten_with_path(model.params)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        array = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}".encode())
        h.update(array.data)
    return h.hexdigest()


def model_record(model, fingerprint: str | None = None) -> dict[str, Any]:
    workdir = getattr(model, "workdir", None)
    return {
        "workdir": paths_lib.to_str(workdir) if workdir else None,
        "step": getattr(model, "step", None),
        "params": getattr(model, "params_kind", "raw"),  # raw | ema
        "fingerprint": fingerprint or model_fingerprint(model),
    }


@dataclass
class UpdateReport:
    """What one `update` did; `embedded` = new + changed files that were read."""

    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: int = 0
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def embedded(self) -> int:
        return len(self.new) + len(self.changed)

    def summary(self) -> str:
        return (f"{self.embedded} embedded ({len(self.new)} new, {len(self.changed)} changed), "
                f"{self.unchanged} unchanged, {len(self.removed)} removed, "
                f"{len(self.skipped)} skipped as unreadable")


class EmbeddingCache:
    """Rows of L2-normalised image embeddings keyed by file path, with their file stats."""

    def __init__(self, directory: str, paths: list[str], sizes: np.ndarray,
                 mtimes: np.ndarray, embeddings: np.ndarray, meta: dict[str, Any]):
        self.directory = paths_lib.to_str(directory)
        self.paths = paths
        self.sizes = np.asarray(sizes, np.int64)
        self.mtimes = np.asarray(mtimes, np.int64)
        self.embeddings = embeddings
        self.meta = meta

    # ------------------------------------------------------------------ reading

    @classmethod
    def empty(cls, directory: str, dim: int = 0, dtype: str = "float16") -> EmbeddingCache:
        return cls(directory, [], np.zeros(0, np.int64), np.zeros(0, np.int64),
                   np.zeros((0, dim), dtype), {"format": FORMAT, "dtype": dtype, "dim": dim,
                                               "count": 0, "revision": "", "skipped": []})

    @staticmethod
    def exists(directory: str) -> bool:
        return paths_lib.exists(paths_lib.join(directory, META))

    @classmethod
    def open(cls, directory: str) -> EmbeddingCache:
        """Reads a cache; a missing or inconsistent one is a ClipjaxError."""
        if not cls.exists(directory):
            raise ClipjaxError(f"{directory}: no embedding cache here ({META} missing); "
                               "create one with `clipjax embed`")
        try:
            meta = json.loads(paths_lib.read_text(paths_lib.join(directory, META)))
            files = json.loads(paths_lib.read_text(paths_lib.join(directory, FILES)))
            embeddings = _load_array(paths_lib.join(directory, EMBEDDINGS))
        except (OSError, ValueError) as e:
            raise ClipjaxError(f"{directory}: cannot read the embedding cache: {e}") from None
        if meta.get("format") != FORMAT:
            raise ClipjaxError(f"{directory}: cache format {meta.get('format')!r}, "
                               f"this clipjax reads {FORMAT}")
        n = len(files["paths"])
        if not (files.get("revision") == meta.get("revision") and meta.get("count") == n
                and embeddings.shape[0] == n):
            raise ClipjaxError(f"{directory}: files of the cache disagree (interrupted write?); "
                               "re-run `clipjax embed --rebuild`")
        return cls(directory, list(files["paths"]), np.asarray(files["sizes"], np.int64),
                   np.asarray(files["mtime_ns"], np.int64), embeddings, meta)

    @classmethod
    def open_or_empty(cls, directory: str, dtype: str = "float16") -> EmbeddingCache:
        return cls.open(directory) if cls.exists(directory) else cls.empty(directory, dtype=dtype)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1]) if self.embeddings.ndim == 2 else 0

    @property
    def revision(self) -> str:
        return self.meta.get("revision", "")

    @property
    def model(self) -> dict[str, Any]:
        return self.meta.get("model") or {}

    @property
    def skipped(self) -> list[dict[str, str]]:
        return list(self.meta.get("skipped", []))

    def vectors(self) -> np.ndarray:
        """float32 [N, D], renormalised (float16 storage rounds the norms slightly)."""
        x = np.asarray(self.embeddings, np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    # ------------------------------------------------------------------ updating

    def update(self, model, specs: str | Sequence[str], *, batch_size: int = 64,
               dtype: str | None = None, prune: bool = False, rebuild: bool = False,
               fingerprint: str | None = None, progress: bool = True,
               workers: int = 0, save_interval_s: float = 600.0) -> UpdateReport:
        """Embeds the new and changed images named by `specs` and saves the cache.

        `prune` also drops rows of existing files that `specs` no longer names;
        `rebuild` re-embeds everything (needed to switch models or dtype). The
        cache is saved every `save_interval_s` seconds and when the run stops
        (also on an error or Ctrl-C), so an interrupted run keeps its work.
        """
        dtype = dtype or self.meta.get("dtype", "float16")
        if dtype not in DTYPES:
            raise ClipjaxError(f"cache dtype {dtype!r}: choose from {', '.join(DTYPES)}")
        record = model_record(model, fingerprint)
        if len(self) and not rebuild:
            old = self.model.get("fingerprint")
            if old != record["fingerprint"]:
                raise ClipjaxError(
                    f"{self.directory} holds embeddings of another model "
                    f"({_describe(self.model)}); pass --rebuild to re-embed with "
                    f"{_describe(record)}, or use another --out")
            if dtype != self.meta.get("dtype"):
                raise ClipjaxError(f"{self.directory} stores {self.meta.get('dtype')}; pass "
                                   f"--rebuild to switch to {dtype}")
        report = UpdateReport()
        scanned = image_files.find_images(specs)
        stats: dict[str, tuple[int, int]] = {}
        for path in scanned:
            try:
                st = os.stat(path)
            except OSError as e:
                report.skipped.append((path, f"cannot stat: {e.strerror or e}"))
                continue
            stats[path] = (int(st.st_size), int(st.st_mtime_ns))

        # Rows to keep (path -> (size, mtime, row)) and files to embed.
        kept: dict[str, tuple[int, int, np.ndarray]] = {}
        previous = {} if rebuild else {p: i for i, p in enumerate(self.paths)}
        for path, i in previous.items():
            if path in stats:
                if stats[path] == (int(self.sizes[i]), int(self.mtimes[i])):
                    kept[path] = (stats[path][0], stats[path][1], self.embeddings[i])
                    report.unchanged += 1
                else:
                    report.changed.append(path)
            elif prune or not os.path.exists(path):
                report.removed.append(path)
            else:  # outside this run's specs but still on disk: keep as is
                kept[path] = (int(self.sizes[i]), int(self.mtimes[i]), self.embeddings[i])
        todo = [p for p in stats if p not in kept]
        report.new = [p for p in todo if p not in previous]

        def commit():
            rows_changed = bool(rebuild or report.embedded or report.removed or not len(self)
                                or self.model.get("fingerprint") != record["fingerprint"])
            self._assemble(kept, dtype, model.embed_dim, record, report, rows_changed)
            self.save()

        fresh, last_save = 0, time.monotonic()
        bar = _progress(len(todo), progress, "embedding")
        try:
            for ok, pixels, bad in image_files.iter_batches(
                    todo, model.preprocess.pixels, batch_size, workers=workers):
                for e in bad:
                    report.skipped.append((e.path, e.why))
                if ok:
                    emb = model.encode_images(pixels, batch_size=batch_size)
                    for path, row in zip(ok, emb.astype(dtype)):
                        kept[path] = (*stats[path], row)
                    fresh += len(ok)
                bar.update(len(ok) + len(bad))
                if fresh and time.monotonic() - last_save > save_interval_s:
                    commit()
                    fresh, last_save = 0, time.monotonic()
        finally:
            bar.close()
            # A changed file that became unreadable keeps no stale row.
            unreadable = {p for p, _ in report.skipped}
            report.changed = [p for p in report.changed if p not in unreadable]
            report.new = [p for p in report.new if p not in unreadable]
            report.removed += [p for p in previous if p in unreadable and p not in kept]
            commit()
        return report

    def _assemble(self, kept, dtype, dim, record, report, rows_changed: bool) -> None:
        paths = sorted(kept)
        self.paths = paths
        self.sizes = np.array([kept[p][0] for p in paths], np.int64)
        self.mtimes = np.array([kept[p][1] for p in paths], np.int64)
        rows = np.empty((len(paths), dim), dtype)
        for i, p in enumerate(paths):
            rows[i] = kept[p][2]
        self.embeddings = rows
        self.meta = {
            "format": FORMAT,
            "model": record,
            "dim": int(dim),
            "dtype": dtype,
            "count": len(paths),
            "revision": uuid.uuid4().hex if rows_changed else self.revision,
            "updated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "skipped": [{"path": p, "reason": r} for p, r in report.skipped],
        }

    def save(self) -> None:
        """Writes the three files atomically each; meta.json last, naming the revision."""
        try:
            self._save()
        except OSError as e:
            raise ClipjaxError(f"cannot write the embedding cache {self.directory}: "
                               f"{e.strerror or e}") from None

    def _save(self) -> None:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(self.embeddings))
        paths_lib.write_bytes(paths_lib.join(self.directory, EMBEDDINGS), buf.getvalue())
        files = {"revision": self.revision, "paths": self.paths,
                 "sizes": self.sizes.tolist(), "mtime_ns": self.mtimes.tolist()}
        paths_lib.write_text(paths_lib.join(self.directory, FILES), json.dumps(files))
        paths_lib.write_text(paths_lib.join(self.directory, META), json.dumps(self.meta, indent=1))


def _describe(record: dict[str, Any]) -> str:
    where = record.get("workdir") or "in-memory params"
    step = f" step {record['step']}" if record.get("step") is not None else ""
    return f"{where}{step}, fingerprint {str(record.get('fingerprint'))[:12]}"


def _load_array(path) -> np.ndarray:
    """A local .npy memory-mapped (rows are read on demand); a remote one read whole."""
    local = paths_lib.local(path)
    if local is not None:
        return np.load(local, mmap_mode="r")
    return np.load(io.BytesIO(paths_lib.read_bytes(path)))


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled or total == 0,
                dynamic_ncols=True)
