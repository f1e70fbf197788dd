"""CLIP scores of every image-caption pair in webdataset shards, on any number of processes.

Each process takes every `count`-th shard (shard i goes to process i % count), so
processes never write the same table and need no collective while they work;
one table per shard is written whole (`tables`), so a restarted run skips the
shards already done. Decoding, resizing and tokenizing run in a thread pool
(PIL releases the GIL) one chunk ahead of the device, which embeds the current
chunk with the model's jitted encoders over this process's local devices.

Columns: shard, key, caption, cosine (image·text of the L2-normalised
embeddings: DataComp's and LAION's "CLIP score"), clipscore (2.5·max(cos, 0),
Hessel et al.), and with `embeddings=True` image_embedding / text_embedding
(float16).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from clipjax import paths, threaded
from clipjax.apps.clipscore import W as CLIPSCORE_W
from clipjax.curation import samples as samples_lib
from clipjax.curation import tables
from clipjax.data import decode
from clipjax.errors import ClipjaxError

log = logging.getLogger(__name__)

CHUNK = 256  # pairs decoded and embedded together


def assign(urls: Sequence[str], index: int, count: int) -> list[str]:
    """This process's shards: every `count`-th from `index` (the same split however often
    it is asked; the union over processes is every shard once)."""
    if not 0 <= index < count:
        raise ClipjaxError(f"process index {index} outside 0..{count - 1}")
    return list(urls[index::count])


@dataclass
class _Chunk:
    shard: int
    keys: list[str]
    captions: list[str]
    pixels: np.ndarray  # uint8 [n, S, S, 3]
    tokens: np.ndarray  # int32 [n, L]
    last: bool = False  # the shard's final chunk
    skipped: dict[str, int] = field(default_factory=dict)  # the shard's, on the last chunk


@dataclass
class Report:
    shards: int = 0  # scored now
    resumed: int = 0  # already had a table
    pairs: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        rate = self.pairs / self.seconds if self.seconds else 0.0
        return {"shards_scored": self.shards, "shards_skipped_done": self.resumed,
                "pairs": self.pairs, "skipped": self.skipped,
                "seconds": round(self.seconds, 3), "pairs_per_sec": round(rate, 2)}


class _Prepare:
    """Raw record -> (key, caption, uint8 pixels) or BadSample, with the model's recipe."""

    def __init__(self, model, max_pixels: int):
        self.pixels = model.preprocess.pixels
        size = model.image_size
        self.draft = (size, size)  # decode JPEGs at the smallest scale that covers the crop
        self.max_pixels = max_pixels

    def __call__(self, record: dict):
        try:
            d = samples_lib.decode_record(record, self.max_pixels, self.draft)
            return d.key, d.caption, self.pixels(d.image)
        except decode.BadSample as e:
            return e


def _chunks(model, urls: Sequence[str], pool: ThreadPoolExecutor, max_pixels: int,
            chunk: int) -> Iterator[_Chunk]:
    prepare = _Prepare(model, max_pixels)
    size = model.image_size
    for s, url in enumerate(urls):
        skipped: dict[str, int] = {}
        batches = threaded.map_batches(prepare, samples_lib.iter_records(url), chunk, pool)
        for outs, done in itertools.chain(batches, [([], True)]):
            good = []
            for out in outs:
                if isinstance(out, decode.BadSample):
                    samples_lib.count(skipped, out.reason)
                else:
                    good.append(out)
            if not good and not done:
                continue
            keys = [g[0] for g in good]
            caps = [g[1] for g in good]
            pixels = (np.stack([g[2] for g in good]) if good
                      else np.zeros((0, size, size, 3), np.uint8))
            tokens = (np.asarray(model.tokenize(caps), np.int32) if caps
                      else np.zeros((0, model.context_length), np.int32))
            yield _Chunk(s, keys, caps, pixels, tokens, last=done,
                         skipped=skipped if done else {})
            if done:
                break


@functools.lru_cache(maxsize=8)
def _pair_fn(model_key: str, mesh):
    """One jitted program for both towers and the cosine: one dispatch per batch, and XLA
    may run the towers side by side (the model is built as `ClipModel`'s encoders build it,
    so the embeddings are the same)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from clipjax import config as config_lib
    from clipjax import models

    module = models.build_model(config_lib.from_json(model_key).model)

    def apply(params, images, tokens):
        img = module.apply({"params": params}, images, method=lambda m, v: m.encode_image(v))
        txt = module.apply({"params": params}, tokens, method=lambda m, t: m.encode_text(t))
        return img, txt, jnp.sum(img * txt, axis=-1)

    batch = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(apply, in_shardings=(replicated, batch, batch),
                   out_shardings=(batch, batch, batch)), batch


def score_pairs(model, pixels: np.ndarray, tokens: np.ndarray, batch_size: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image_emb, text_emb, cosine) of uint8 images and token ids, row i with row i."""
    import jax

    n = len(pixels)
    fn, sharding = _pair_fn(model._model_key, model._mesh)
    b = model.batch_for(n, batch_size)  # fixed shapes: pad the last batch
    results = []
    for start in range(0, n, b):
        x = model.preprocess.batch(pixels[start:start + b])
        t = np.asarray(tokens[start:start + b], np.int32)
        if len(x) < b:
            x = np.concatenate([x, np.zeros((b - len(x), *x.shape[1:]), x.dtype)])
            t = np.concatenate([t, np.zeros((b - len(t), t.shape[1]), t.dtype)])
        results.append(fn(model.params, jax.device_put(x, sharding),
                          jax.device_put(t, sharding)))  # dispatched asynchronously
    img, txt, cos = (np.concatenate([np.asarray(r[i]) for r in results])[:n] for i in range(3))
    return img, txt, cos.astype(np.float32)


def score_shards(model, urls: Sequence[str], out_dir: str, *, batch_size: int = CHUNK,
                 embeddings: bool = False, workers: int = 0,
                 max_pixels: int = samples_lib.DEFAULT_MAX_PIXELS,
                 model_info: dict | None = None, progress=None) -> Report:
    """Scores every shard of `urls` that has no table in `out_dir` yet; returns the report."""
    out_dir = paths.canonical(out_dir)
    paths.makedirs(out_dir)
    report = Report()
    todo = []
    present = set(paths.listdir(out_dir))
    for u in urls:
        if tables.table_name(u) in present:
            report.resumed += 1
        else:
            todo.append(u)
    if not todo:
        return report
    start = time.perf_counter()
    parts: list[tuple] = []
    workers = workers or min(8, max(2, (os.cpu_count() or 2)))
    with ThreadPoolExecutor(workers) as pool:
        for c in threaded.prefetch(_chunks(model, todo, pool, max_pixels, batch_size)):
            if len(c.keys):
                parts.append((c.keys, c.captions, *score_pairs(model, c.pixels, c.tokens,
                                                              batch_size)))
            if c.last:
                n = _write_shard(out_dir, todo[c.shard], parts, c.skipped, embeddings,
                                 model_info or {})
                report.shards += 1
                report.pairs += n
                for k, v in c.skipped.items():
                    report.skipped[k] = report.skipped.get(k, 0) + v
                parts = []
                if progress is not None:
                    progress(todo[c.shard], n, c.skipped)
    report.seconds = time.perf_counter() - start
    return report


def _write_shard(out_dir: str, url: str, parts: list[tuple], skipped: dict, embeddings: bool,
                 model_info: dict) -> int:
    keys = [k for p in parts for k in p[0]]
    captions = [c for p in parts for c in p[1]]
    d = int(model_info.get("embed_dim", 0)) or (parts[0][2].shape[1] if parts else 1)
    img = np.concatenate([p[2] for p in parts]) if parts else np.zeros((0, d), np.float32)
    txt = np.concatenate([p[3] for p in parts]) if parts else np.zeros((0, d), np.float32)
    cos = np.concatenate([p[4] for p in parts]) if parts else np.zeros((0,), np.float32)
    columns = {
        "shard": pa.array([url] * len(keys), pa.string()),
        "key": pa.array(keys, pa.string()),
        "caption": pa.array(captions, pa.string()),
        "cosine": pa.array(cos, pa.float32()),
        "clipscore": pa.array(CLIPSCORE_W * np.maximum(cos, 0.0), pa.float32()),
    }
    if embeddings:
        columns["image_embedding"] = tables.embedding_column(img)
        columns["text_embedding"] = tables.embedding_column(txt)
    meta = {"shard": url, "pairs": len(keys), "skipped": skipped, **model_info}
    tables.write(tables.table_path(out_dir, url), columns, meta)
    return len(keys)
