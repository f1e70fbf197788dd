"""Inner-product vector indexes over unit vectors (cosine similarity), via faiss.

* `exact`: `IndexFlatIP`, brute force: exact top-k, no training, the default.
  Fine up to a few million vectors (a query costs N·d multiply-adds). Built
  with `scan_threads`, it also keeps a float16 copy in that many shards for
  one to three queries (see `search`).
* `ivf`: `IndexIVFFlat`: k-means into `nlist` cells (trained on a sample of
  64·nlist vectors), a query scans the `nprobe` nearest cells. Build = k-means
  + assigning every vector; recall rises with nprobe, latency with nprobe/nlist.
* `hnsw`: `IndexHNSWFlat`: a navigable small-world graph; no training, slow to
  build, fast to query; recall rises with efSearch.

Vectors go in as float32 rows; callers L2-normalise them so that inner product
is cosine similarity. Saved indexes go through `clipjax.paths` as bytes
(`faiss.serialize_index`), so they may live in a bucket.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import faiss
import numpy as np

from clipjax import paths
from clipjax.errors import ClipjaxError

KINDS = ("exact", "ivf", "hnsw")


@dataclass(frozen=True)
class IndexOptions:
    """How to build and query an index; zeros mean "pick from the data size"."""

    kind: str = "exact"
    nlist: int = 0  # ivf: number of k-means cells; 0 = about sqrt(N)
    nprobe: int = 32  # ivf: cells scanned per query
    hnsw_m: int = 32  # hnsw: graph degree
    ef_construction: int = 80  # hnsw: candidate list size while building
    ef_search: int = 64  # hnsw: candidate list size while searching
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ClipjaxError(f"index kind {self.kind!r}: choose from {', '.join(KINDS)}")
        for name in ("nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise ClipjaxError(f"index option {name} must be >= 1, got {getattr(self, name)}")
        if self.nlist < 0:
            raise ClipjaxError(f"index option nlist must be >= 0, got {self.nlist}")


TRAIN_POINTS_PER_CELL = 64  # k-means trains on a sample of 64·nlist vectors


def auto_nlist(n: int) -> int:
    """About sqrt(N) cells (1,000 at 1M: ~1,000 vectors per cell), with at least 39
    training points per cell (faiss's minimum)."""
    return int(max(1, min(round(math.sqrt(max(n, 1))), n // 39)))


def as_rows(vectors) -> np.ndarray:
    """A C-contiguous float32 [N, d] array (what faiss takes)."""
    x = np.asarray(vectors)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ClipjaxError(f"expected vectors of shape [N, d], got {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def build(vectors, options: IndexOptions = IndexOptions(), *,
          scan_threads: int = 0) -> faiss.Index:
    """An index holding `vectors` (row i gets id i). `scan_threads` > 0 (exact only)
    adds the float16 scan shards: 1.5x the memory, a single query ~3x faster."""
    x = as_rows(vectors)
    n, d = x.shape
    if options.kind == "exact":
        if scan_threads > 0 and n >= SCAN_MIN_ROWS:
            index = _FlatWithScan(d)
            index.half_scan = _half_scan(x, scan_threads)
        else:
            index = faiss.IndexFlatIP(d)
    elif options.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = options.ef_construction
    else:
        nlist = min(options.nlist or auto_nlist(n), max(n, 1))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = options.seed
        # Train on a sample: k-means cost is sample × nlist × d per iteration.
        index.cp.max_points_per_centroid = TRAIN_POINTS_PER_CELL
        if n < index.cp.min_points_per_centroid * nlist:  # small data: train quietly
            index.cp.min_points_per_centroid = 1
        if n:
            index.train(x)
    if n:
        index.add(x)
    configure(index, options)
    return index


def configure(index: faiss.Index, options: IndexOptions) -> faiss.Index:
    """Sets the query-time knobs (nprobe, efSearch) of a built or loaded index."""
    ivf = _as_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(options.nprobe, ivf.nlist)
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = options.ef_search
    return index


def _as_ivf(index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def kind_of(index: faiss.Index) -> str:
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    return "ivf" if _as_ivf(index) is not None else "exact"


def search(index: faiss.Index, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids), each [Q, k'] with k' = min(k, index size), best first.

    An approximate index may find fewer than k' neighbours for a query; those
    slots hold id -1 and score -inf.
    """
    if k < 1:
        raise ClipjaxError(f"k must be >= 1, got {k}")
    q = as_rows(queries)
    if q.shape[1] != index.d:
        raise ClipjaxError(f"query dimension {q.shape[1]} != index dimension {index.d}")
    k = min(k, index.ntotal)
    if k == 0:
        return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    scan = getattr(index, "half_scan", None)
    with _threads(1 if len(q) < SMALL_BATCH else 0), _kernel(len(q)):
        if scan is not None and len(q) < BLAS_FROM:
            scores, ids = _rescored(index, scan, q, k)
        else:
            scores, ids = index.search(q, k)
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    return scores, ids.astype(np.int64)


# Below 20 queries OpenMP threads only add wake-up cost: one thread answers a
# single query 4x faster (measured: 1M x 512 exact, 2 cores).
SMALL_BATCH = 20
# A flat search scans the vectors once per query (memory-bound: 11 ms for one
# query over 100k x 512) or, as one BLAS product, once per batch with a fixed
# cost of ~40 ms; the product wins from 4 queries on (measured, 1 thread:
# 1 query 11 vs 40 ms, 2: 22 vs 42, 4: 39 vs 38, 8: 80 vs 46, 32: 327 vs 77).
BLAS_FROM = 4


# The float16 scan: a single query over a flat index is memory-bound and faiss
# scans it on one thread (100k x 512: 30-35 ms here). A float16 copy in one shard
# per thread, scanned concurrently, takes 10-11 ms (2 threads); its top
# k + RESCORE_EXTRA are then rescored in float32 from the flat index, so the
# result is the flat index's top-k unless float16 rounding (score error ~1e-5)
# pushed a true top-k row below RESCORE_EXTRA others.
SCAN_MIN_ROWS = 20_000  # below this a scan takes a few ms anyway
RESCORE_EXTRA = 32


class _FlatWithScan(faiss.IndexFlatIP):
    """A flat index that carries its float16 scan shards (faiss refuses new
    attributes on its own classes)."""

    half_scan = None


def _half_scan(x: np.ndarray, threads: int) -> faiss.Index:
    d = x.shape[1]
    shards = faiss.IndexShards(d, True, True)  # threaded, successive ids
    parts = []
    for rows in np.array_split(x, max(1, min(int(threads), 16))):  # contiguous views
        part = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
        part.add(rows)
        shards.add_shard(part)
        parts.append(part)
    shards.referenced_objects = parts  # the Python side owns the shards
    return shards


def _rescored(index: faiss.IndexFlat, scan: faiss.Index, q: np.ndarray, k: int):
    """Candidates from the float16 scan, scored exactly against the float32 rows."""
    _, candidates = scan.search(q, min(index.ntotal, k + RESCORE_EXTRA))
    rows = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(
        index.ntotal, index.d)  # the flat index's own float32 rows, not a copy
    scores = np.full((len(q), k), -np.inf, np.float32)
    ids = np.full((len(q), k), -1, np.int64)
    for j, cand in enumerate(candidates):
        cand = cand[cand >= 0]
        s = rows[cand] @ q[j]
        best = np.argsort(-s, kind="stable")[:k]
        scores[j, :len(best)], ids[j, :len(best)] = s[best], cand[best]
    return scores, ids


@contextlib.contextmanager
def _kernel(n: int):
    """Scan per query below BLAS_FROM queries, one BLAS product from there on.

    Set per call through faiss's `distance_compute_blas_threshold` at either
    extreme, because its meaning changed: older faiss counts queries (BLAS when
    n >= threshold, default 20), newer (1.15) queries x d (BLAS when n * d >=
    threshold, default 128,000), where a threshold meant in queries sends even a
    single query to BLAS.
    """
    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 0 if n >= BLAS_FROM else 2**31 - 1
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = old


@contextlib.contextmanager
def _threads(n: int):
    """Runs faiss with `n` OpenMP threads (0 = leave as is), restoring the setting."""
    old = faiss.omp_get_max_threads()
    if not n or n == old:
        yield
        return
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def save(index: faiss.Index, path: str) -> None:
    """Writes the index whole (a local tmp + rename, or one object upload)."""
    paths.write_bytes(path, faiss.serialize_index(index).tobytes())


def load(path: str) -> faiss.Index:
    try:
        data = np.frombuffer(paths.read_bytes(path), np.uint8)
        return faiss.deserialize_index(data)
    except RuntimeError as e:
        raise ClipjaxError(f"{path}: cannot read faiss index: {e}") from None
