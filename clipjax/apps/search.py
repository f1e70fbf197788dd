"""Text→image and image→image search over an embedding cache.

`ImageIndex` pairs an `EmbeddingCache` with a faiss index of its rows (exact by
default; an approximate one is built once per cache revision and kept next to
the cache, on local disk or in a bucket alike). `search` turns a query — text,
an image, or a vector — into a unit vector with the model that made the cache,
and returns the top hits.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from clipjax import paths
from clipjax.apps import image_files, vector_index
from clipjax.apps.embedding_cache import EmbeddingCache, model_fingerprint
from clipjax.errors import ClipjaxError


@dataclass(frozen=True)
class Hit:
    path: str
    score: float  # cosine similarity

    def to_json(self) -> dict:
        return {"path": self.path, "score": round(float(self.score), 6)}


class ImageIndex:
    """An embedding cache and a vector index over its rows (row i = `paths[i]`)."""

    def __init__(self, cache: EmbeddingCache, index, options: vector_index.IndexOptions):
        self.cache = cache
        self.index = index
        self.options = options

    @classmethod
    def open(cls, directory: str, kind: str = "exact", *, save: bool = True,
             **knobs) -> ImageIndex:
        """Opens the cache in `directory` with a `kind` index (see vector_index.KINDS).

        An approximate index is loaded from `directory/<kind>.faiss` when it was
        built from the cache's current revision with the same build options,
        else built (and saved there when `save`).
        """
        cache = EmbeddingCache.open(directory)
        return cls.from_cache(cache, kind, save=save, **knobs)

    @classmethod
    def from_cache(cls, cache: EmbeddingCache, kind: str = "exact", *, save: bool = False,
                   **knobs) -> ImageIndex:
        options = vector_index.IndexOptions(kind=kind, **knobs)
        if kind == "exact" or not len(cache):
            threads = min(8, os.cpu_count() or 1)  # the float16 scan for single queries
            return cls(cache, vector_index.build(cache.vectors(), options,
                                                 scan_threads=threads), options)
        index = _load_saved(cache, options)
        if index is None:
            index = vector_index.build(cache.vectors(), options)
            if save:
                _save(cache, options, index)
        return cls(cache, vector_index.configure(index, options), options)

    @property
    def paths(self) -> list[str]:
        return self.cache.paths

    @property
    def kind(self) -> str:
        return self.options.kind

    def __len__(self) -> int:
        return len(self.cache)

    def search_vectors(self, queries, k: int = 10) -> list[list[Hit]]:
        """Top-k hits for each row of `queries` [Q, D] (unit vectors)."""
        q = vector_index.as_rows(queries)
        if len(self) and q.shape[1] != self.cache.dim:
            raise ClipjaxError(f"query dimension {q.shape[1]} != index dimension "
                               f"{self.cache.dim}")
        scores, ids = vector_index.search(self.index, q, k)
        return [[Hit(self.paths[i], float(s)) for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores, ids)]


def _ann_files(cache: EmbeddingCache, kind: str) -> tuple[str, str]:
    return (os.fspath(paths.join(cache.directory, f"{kind}.faiss")),
            os.fspath(paths.join(cache.directory, f"{kind}.json")))


def _build_record(cache: EmbeddingCache, options: vector_index.IndexOptions) -> dict:
    """What the saved index depends on: the cache revision and the build-time options."""
    build_opts = asdict(options)
    for knob in ("nprobe", "ef_search"):  # query-time only
        build_opts.pop(knob)
    return {"revision": cache.revision, "options": build_opts}


def _load_saved(cache: EmbeddingCache, options):
    index_file, record_file = _ann_files(cache, options.kind)
    try:
        record = json.loads(paths.read_text(record_file))
    except (OSError, ValueError):
        return None
    if record != _build_record(cache, options) or not paths.exists(index_file):
        return None
    return vector_index.load(index_file)


def _save(cache: EmbeddingCache, options, index) -> None:
    index_file, record_file = _ann_files(cache, options.kind)
    try:
        vector_index.save(index, index_file)
        paths.write_text(record_file, json.dumps(_build_record(cache, options)))
    except OSError as e:  # a read-only cache still searches; it just rebuilds next time
        warnings.warn(f"cannot save the {options.kind} index in {cache.directory}: {e}",
                      stacklevel=3)


# ---------------------------------------------------------------------- queries


def recorded_model(index: ImageIndex, workdir: str | None, step: int | None
                   ) -> tuple[str, int | None]:
    """(workdir, step) of the model to query with: the given one, else the one the cache
    records (it must be the model that embedded the images)."""
    if workdir is not None:
        return workdir, step
    workdir = index.cache.model.get("workdir")
    if not workdir:
        raise ClipjaxError(f"{index.cache.directory} records no model workdir; give --workdir")
    return workdir, index.cache.model.get("step") if step is None else step


def check_model(model, index: ImageIndex) -> None:
    """The model must be the one that embedded the cache (same fingerprint)."""
    want = index.cache.model.get("fingerprint")
    if want and cached_fingerprint(model) != want:
        raise ClipjaxError(
            f"{index.cache.directory} was embedded by another model (fingerprint "
            f"{want[:12]}); query it with that model or re-run `clipjax embed --rebuild`")


def cached_fingerprint(model) -> str:
    """`model_fingerprint`, computed once per params object."""
    saved = getattr(model, "_clipjax_fingerprint", None)
    if saved is None or saved[0] is not model.params:
        saved = (model.params, model_fingerprint(model))
        model._clipjax_fingerprint = saved
    return saved[1]


def _is_image_path(q) -> bool:
    if isinstance(q, os.PathLike):
        return True
    return isinstance(q, str) and image_files.is_image_file(q) and os.path.isfile(q)


def _is_vectors(q) -> bool:
    return hasattr(q, "dtype") and np.issubdtype(np.asarray(q).dtype, np.floating) \
        and np.asarray(q).ndim in (1, 2)


def query_vectors(model, query) -> np.ndarray:
    """float32 [Q, D] unit vectors for a query: a text or list of texts; an image (PIL,
    or the path of an existing image file) or list of images; vectors [D] or [Q, D]."""
    if _is_vectors(query):
        q = vector_index.as_rows(query)
        return q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    if model is None:
        raise ClipjaxError("a model is needed to embed a text or image query")
    if isinstance(query, str) and not _is_image_path(query):
        return model.encode_texts([query])
    if isinstance(query, list | tuple) and query and all(
            isinstance(q, str) and not _is_image_path(q) for q in query):
        return model.encode_texts(list(query))
    return model.encode_images(query)


def search_many(model, index, queries, k: int = 10, *, kind: str = "exact"
                ) -> list[list[Hit]]:
    """Top-k hits for each query (see `query_vectors`); `index` is an ImageIndex, an
    EmbeddingCache, or the directory of one."""
    index = as_index(index, kind)
    if model is not None and not _is_vectors(queries):
        check_model(model, index)
    return index.search_vectors(query_vectors(model, queries), k)


def search(model, index, query, k: int = 10, *, kind: str = "exact") -> list[Hit]:
    """Top-k hits for one query, best first."""
    hits = search_many(model, index, query, k, kind=kind)
    if len(hits) != 1:
        raise ClipjaxError(f"search takes one query; got {len(hits)} (use search_many)")
    return hits[0]


def as_index(index, kind: str = "exact") -> ImageIndex:
    if isinstance(index, ImageIndex):
        return index
    if isinstance(index, EmbeddingCache):
        return ImageIndex.from_cache(index, kind)
    if isinstance(index, str | os.PathLike):
        return ImageIndex.open(os.fspath(index), kind)
    raise ClipjaxError(f"expected an ImageIndex, an EmbeddingCache or a directory; "
                       f"got {type(index).__name__}")
