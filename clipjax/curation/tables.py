"""Per-shard result tables: one Parquet file per scored shard, written whole.

A file's name comes from the shard's URL (`<stem>-<sha1 of url>.parquet`), so
shards with the same basename in different folders never collide, and a
scoring run that died part-way resumes by skipping shards whose file exists.
The file's schema metadata (`clipjax` key) records the shard URL, the samples
skipped by reason, and the model that scored it.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipjax import paths
from clipjax.errors import ClipjaxError

META_KEY = b"clipjax"
SUFFIX = ".parquet"


def table_name(url: str) -> str:
    base = url.rsplit("/", 1)[-1]
    stem = base[:-4] if base.endswith(".tar") else base
    return f"{stem}-{hashlib.sha1(url.encode()).hexdigest()[:10]}{SUFFIX}"


def table_path(out_dir: str, url: str) -> str:
    return f"{out_dir.rstrip('/')}/{table_name(url)}"


def embedding_column(rows: np.ndarray) -> pa.Array:
    """float [N, D] -> a fixed-size list column of float16 (half the bytes, ~3 digits)."""
    rows = np.ascontiguousarray(rows, np.float16)
    flat = pa.array(rows.reshape(-1), pa.float16())
    return pa.FixedSizeListArray.from_arrays(flat, rows.shape[1])


def embeddings(table: pa.Table, column: str) -> np.ndarray:
    """A fixed-size list column -> float32 [N, D]."""
    col = table.column(column).combine_chunks()
    d = col.type.list_size
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, d)


def write(path: str, columns: dict[str, pa.Array], meta: dict) -> None:
    table = pa.table(columns)
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    with paths.atomic_writer(path) as f:  # whole or absent: a crash never leaves half a file
        f.write(buf.getvalue())


def read(path: str, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(io.BytesIO(paths.read_bytes(path)), columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise ClipjaxError(f"cannot read score table {path}: {e}") from None


def meta_of(table: pa.Table) -> dict:
    raw = (table.schema.metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}


def list_tables(directory: str) -> list[str]:
    """The score tables in a directory (sorted); a ClipjaxError when there are none."""
    directory = paths.canonical(directory)
    if not paths.is_dir(directory):
        raise ClipjaxError(f"--scores {directory}: no such directory")
    names = sorted(n for n in paths.listdir(directory) if n.endswith(SUFFIX))
    if not names:
        raise ClipjaxError(f"--scores {directory}: no score tables (*.parquet); "
                           "run `clipjax data score` first")
    return [f"{directory.rstrip('/')}/{n}" for n in names]


def read_all(directory: str, columns: list[str]) -> tuple[pa.Table, list[dict]]:
    """Every table of a directory concatenated, and each one's metadata."""
    tables = [read(p, columns) for p in list_tables(directory)]
    metas = [meta_of(t) for t in tables]
    tables = [t.replace_schema_metadata(None) for t in tables]
    return pa.concat_tables(tables), metas
