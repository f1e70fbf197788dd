"""Embedding cache, vector index and search on real photos with a tiny random CLIP."""

import copy
import json
import os
import shutil

import jax
import numpy as np
import pytest
from apps_data import tiny_model, write_corrupt, write_photos
from PIL import Image

from clipjax.apps import embedding_cache, search, vector_index
from clipjax.apps.embedding_cache import EmbeddingCache
from clipjax.errors import ClipjaxError


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    paths = write_photos(str(folder))
    return str(folder), paths


class CountingModel:
    """The real model, counting the images it is asked to encode."""

    def __init__(self, model):
        self._model = model
        self.encoded = 0

    def encode_images(self, images, **kw):
        out = self._model.encode_images(images, **kw)
        self.encoded += len(out)
        return out

    def __getattr__(self, name):
        return getattr(self._model, name)


def test_each_photo_finds_itself_and_ranking_matches_numpy(model, photos, tmp_path):
    folder, paths = photos
    cache = EmbeddingCache.open_or_empty(str(tmp_path / "idx"), dtype="float32")
    report = cache.update(model, folder, progress=False)
    assert report.embedded == len(paths) and not report.skipped
    assert cache.paths == paths
    index = search.ImageIndex.open(str(tmp_path / "idx"))
    own = model.encode_images(paths)  # embedded again, outside the cache
    np.testing.assert_allclose(index.cache.vectors(), own, atol=1e-5)
    hits = index.search_vectors(own, k=len(paths))
    for path, row in zip(paths, hits):
        assert row[0].path == path and row[0].score == pytest.approx(1.0, abs=1e-5)
    # Text and image queries: the index's ranking is numpy's brute-force ranking.
    vectors = index.cache.vectors()
    queries = np.concatenate([model.encode_texts(["a cat", "a rocket launch", "coins"]), own[:3]])
    for q, row in zip(queries, index.search_vectors(queries, k=5)):
        sims = vectors @ q
        want = np.argsort(-sims, kind="stable")[:5]
        assert [h.path for h in row] == [paths[i] for i in want]
        np.testing.assert_allclose([h.score for h in row], sims[want], atol=1e-5)
    # The public entry point (text via the model) agrees too.
    text_hits = search.search(model, index, "a cat", k=3)
    assert [h.path for h in text_hits] == [h.path for h in index.search_vectors(queries[:1], 3)[0]]


def test_float16_cache_and_approximate_indexes_agree_with_exact(model, photos, tmp_path):
    folder, paths = photos
    cache = EmbeddingCache.open_or_empty(str(tmp_path / "idx"))  # float16 by default
    cache.update(model, folder, progress=False)
    stored = np.load(tmp_path / "idx" / "embeddings.npy")
    assert stored.dtype == np.float16 and stored.shape == (len(paths), model.embed_dim)
    exact = search.ImageIndex.open(str(tmp_path / "idx"))
    own = model.encode_images(paths)
    assert [r[0].path for r in exact.search_vectors(own, 1)] == paths
    for kind in ("ivf", "hnsw"):
        approx = search.ImageIndex.open(str(tmp_path / "idx"), kind)
        assert vector_index.kind_of(approx.index) == kind
        assert os.path.exists(tmp_path / "idx" / f"{kind}.faiss")
        for a, e in zip(approx.search_vectors(own, 5), exact.search_vectors(own, 5)):
            assert [h.path for h in a] == [h.path for h in e]
        # Reopening the same revision loads the saved index instead of rebuilding it.
        mtime = os.stat(tmp_path / "idx" / f"{kind}.faiss").st_mtime_ns
        search.ImageIndex.open(str(tmp_path / "idx"), kind)
        assert os.stat(tmp_path / "idx" / f"{kind}.faiss").st_mtime_ns == mtime


def test_incremental_update_touches_only_new_and_changed_files(model, photos, tmp_path):
    _, paths = photos
    folder = tmp_path / "photos"
    shutil.copytree(os.path.dirname(paths[0]), folder)
    counting = CountingModel(model)
    out = str(tmp_path / "idx")
    cache = EmbeddingCache.open_or_empty(out)
    first = cache.update(counting, str(folder), progress=False)
    n = len(paths)
    assert counting.encoded == n and first.embedded == n
    revision = cache.revision
    before = {p: cache.embeddings[i].copy() for i, p in enumerate(cache.paths)}

    again = EmbeddingCache.open(out).update(counting, str(folder), progress=False)
    assert counting.encoded == n and again.embedded == 0 and again.unchanged == n
    assert EmbeddingCache.open(out).revision == revision  # nothing changed, nothing rewritten

    files = sorted(str(p) for p in folder.rglob("*.*"))
    changed, deleted = files[0], files[1]
    Image.open(files[2]).rotate(90).save(changed)  # new content, new size/mtime
    os.remove(deleted)
    new = str(folder / "more" / "new.png")
    Image.open(files[3]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(new)
    cache = EmbeddingCache.open(out)
    third = cache.update(counting, str(folder), progress=False)
    assert counting.encoded == n + 2
    assert third.new == [new] and third.changed == [changed] and third.removed == [deleted]
    assert third.unchanged == n - 2 and cache.revision != revision
    reopened = EmbeddingCache.open(out)
    assert len(reopened) == n and deleted not in reopened.paths and new in reopened.paths
    for i, p in enumerate(reopened.paths):
        if p not in (changed, new):
            np.testing.assert_array_equal(reopened.embeddings[i], before[p])
    row = reopened.paths.index(changed)
    np.testing.assert_allclose(reopened.vectors()[row], model.encode_images([changed])[0],
                               atol=2e-3)
    # A file only touched (same bytes, new mtime) counts as changed: mtime is the key.
    os.utime(new, ns=(0, 10**18))
    fourth = EmbeddingCache.open(out).update(counting, str(folder), progress=False)
    assert fourth.changed == [new] and counting.encoded == n + 3


def test_interrupted_embed_keeps_finished_batches(model, photos, tmp_path):
    folder, paths = photos

    class StopsOnSecondBatch(CountingModel):
        def encode_images(self, images, **kw):
            if self.encoded:
                raise KeyboardInterrupt
            return super().encode_images(images, **kw)

    out = str(tmp_path / "idx")
    with pytest.raises(KeyboardInterrupt):
        EmbeddingCache.open_or_empty(out).update(StopsOnSecondBatch(model), folder,
                                                 batch_size=4, progress=False)
    partial = EmbeddingCache.open(out)
    assert len(partial) == 4 and set(partial.paths) < set(paths)
    counting = CountingModel(model)
    report = partial.update(counting, folder, batch_size=4, progress=False)
    assert report.unchanged == 4 and counting.encoded == len(paths) - 4


def test_corrupt_images_are_skipped_and_listed(model, photos, tmp_path):
    _, paths = photos
    folder = tmp_path / "photos"
    shutil.copytree(os.path.dirname(paths[0]), folder)
    bad = write_corrupt(str(folder / "broken"))
    cache = EmbeddingCache.open_or_empty(str(tmp_path / "idx"))
    report = cache.update(model, str(folder), progress=False)
    assert sorted(p for p, _ in report.skipped) == bad
    assert all(reason for _, reason in report.skipped)
    assert len(cache) == len(paths) and not set(bad) & set(cache.paths)
    meta = json.load(open(tmp_path / "idx" / "meta.json"))
    assert sorted(s["path"] for s in meta["skipped"]) == bad


def test_cache_refuses_another_model_unless_rebuilt(model, photos, tmp_path):
    folder, paths = photos
    out = str(tmp_path / "idx")
    EmbeddingCache.open_or_empty(out).update(model, paths[:3], progress=False)
    other = copy.copy(model)  # same compiled encoders, different weights
    other.params = jax.tree.map(lambda x: x * 1.5, model.params)
    assert embedding_cache.model_fingerprint(other) != embedding_cache.model_fingerprint(model)
    with pytest.raises(ClipjaxError, match="another model"):
        EmbeddingCache.open(out).update(other, paths[:3], progress=False)
    with pytest.raises(ClipjaxError, match="embedded by another model"):
        search.search(other, out, "a cat")
    report = EmbeddingCache.open(out).update(other, paths[:3], rebuild=True, progress=False)
    assert report.embedded == 3
    assert search.search(other, out, "a cat", k=1)[0].path in paths[:3]


def test_bad_input_is_a_clear_error(model, tmp_path):
    with pytest.raises(ClipjaxError, match="no such file"):
        EmbeddingCache.open_or_empty(str(tmp_path / "i")).update(model, str(tmp_path / "nope"))
    with pytest.raises(ClipjaxError, match="no files match"):
        EmbeddingCache.open_or_empty(str(tmp_path / "i")).update(model, str(tmp_path / "*.jpg"))
    with pytest.raises(ClipjaxError, match="no embedding cache"):
        search.ImageIndex.open(str(tmp_path))
    with pytest.raises(ClipjaxError, match="index kind"):
        vector_index.IndexOptions(kind="lsh")
    index = vector_index.build(np.eye(4, dtype=np.float32))
    with pytest.raises(ClipjaxError, match="dimension"):
        vector_index.search(index, np.ones((1, 3), np.float32), 2)
    with pytest.raises(ClipjaxError, match="k must be"):
        vector_index.search(index, np.ones((1, 4), np.float32), 0)


def test_vector_index_kinds_on_clustered_vectors():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((50, 64))
    x = centers[rng.integers(0, 50, 5000)] + 0.3 * rng.standard_normal((5000, 64))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q = x[:200] + 0.05 * rng.standard_normal((200, 64)).astype(np.float32)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    exact_scores, exact_ids = vector_index.search(vector_index.build(x), q, 10)
    np.testing.assert_array_equal(exact_ids, truth)
    for kind in ("ivf", "hnsw"):
        _, ids = vector_index.search(vector_index.build(x, vector_index.IndexOptions(kind)), q, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)])
        assert recall > 0.9, (kind, recall)
    # Scanning every cell makes IVF exact.
    full = vector_index.build(x, vector_index.IndexOptions("ivf", nlist=16, nprobe=16))
    np.testing.assert_array_equal(vector_index.search(full, q, 10)[1], truth)
    # k above the index size is capped.
    assert vector_index.search(vector_index.build(x[:3]), q[:2], 10)[1].shape == (2, 3)


def test_exact_search_kernels_agree_and_leave_faiss_settings_alone():
    """One query scans, a batch runs as one BLAS product: both are the exact top-k, and
    the process-wide faiss knobs they set for the call are put back."""
    import faiss

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    q = rng.standard_normal((vector_index.BLAS_FROM + 3, 32)).astype(np.float32)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :5]
    index = vector_index.build(x)
    before = faiss.cvar.distance_compute_blas_threshold, faiss.omp_get_max_threads()
    for queries in (q[:1], q):  # below and above BLAS_FROM
        _, ids = vector_index.search(index, queries, 5)
        np.testing.assert_array_equal(ids, truth[:len(queries)])
    assert (faiss.cvar.distance_compute_blas_threshold, faiss.omp_get_max_threads()) == before


def test_float16_scan_shards_give_the_flat_top_k():
    """With scan_threads, one to three queries scan a float16 copy in shards and rescore
    its candidates in float32: the same ids as the flat index, float32 scores; a batch
    of BLAS_FROM or more still goes to the flat index. Clustered rows make near-ties."""
    rng = np.random.default_rng(1)
    n = vector_index.SCAN_MIN_ROWS + 1001  # uneven shards
    centers = rng.standard_normal((20, 48))
    x = centers[rng.integers(0, 20, n)] + 0.05 * rng.standard_normal((n, 48))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q = x[:vector_index.BLAS_FROM] + 0.01 * rng.standard_normal((vector_index.BLAS_FROM, 48))
    q = q.astype(np.float32)
    flat = vector_index.build(x)
    fast = vector_index.build(x, scan_threads=3)
    assert fast.half_scan is not None and fast.half_scan.ntotal == n
    assert not hasattr(vector_index.build(x[:100], scan_threads=3), "half_scan")
    for m in (1, 3, vector_index.BLAS_FROM):
        s_flat, i_flat = vector_index.search(flat, q[:m], 10)
        s_fast, i_fast = vector_index.search(fast, q[:m], 10)
        np.testing.assert_array_equal(i_fast, i_flat)
        np.testing.assert_allclose(s_fast, s_flat, atol=1e-6)
    assert vector_index.search(fast, q[:1], n + 5)[1].shape == (1, n)  # k capped
