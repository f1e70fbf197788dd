"""Batched, sharded embedding of images and texts for the evaluator.

The jitted encoders take the params as an argument, so one compilation serves
every checkpoint of a run (a `--watch` job recompiles nothing). Batches have a
fixed size (the last one is padded) and are split over a 1-D "data" mesh of
the evaluator's own devices; params are replicated there. Host work
(decode, resize, crop) for the next batch runs in threads while the devices
encode the current one.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from clipjax import checkpoint as checkpoint_lib
from clipjax import models
from clipjax.data import preprocess, tokenizers


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.local_devices())
    return Mesh(np.array(devices), ("data",))


def abstract_params(model_cfg: ConfigDict, mesh: Mesh):
    """ShapeDtypeStructs of the params, replicated on `mesh` (the restore target)."""
    shapes = nn.meta.unbox(models.abstract_params(model_cfg))
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                        shapes)


def restore(workdir: str, step: int, model_cfg: ConfigDict, mesh: Mesh):
    """The params of one checkpoint, placed on the evaluator's mesh (params item only)."""
    return checkpoint_lib.restore_params(workdir, step, abstract_params(model_cfg, mesh))


@functools.cache
def _jitted(model_cfg_json: str, mesh: Mesh):
    from clipjax import config as config_lib

    model_cfg = config_lib.from_json(model_cfg_json).model
    model = models.build_model(model_cfg)
    rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def images_fn(params, images):
        return model.apply({"params": params}, images, method=models.Clip.encode_image)

    def texts_fn(params, tokens):
        return model.apply({"params": params}, tokens, method=models.Clip.encode_text)

    jit = functools.partial(jax.jit, in_shardings=(rep, batch), out_shardings=batch)
    return jit(images_fn), jit(texts_fn)


def _padded(x: np.ndarray, size: int) -> np.ndarray:
    if len(x) == size:
        return x
    pad = np.zeros((size - len(x),) + x.shape[1:], x.dtype)
    return np.concatenate([x, pad])


class Encoder:
    """Embeds images and texts with one model's params; outputs L2-normalised float32 numpy."""

    def __init__(self, model_cfg: ConfigDict, params, *, batch_size: int = 256,
                 mesh: Mesh | None = None, workers: int | None = None):
        from clipjax import config as config_lib

        self.model_cfg = model_cfg
        self.mesh = mesh or make_mesh()
        n = self.mesh.devices.size
        self.batch_size = max(n, -(-int(batch_size) // n) * n)  # a multiple of the devices
        self.params = params
        full = config_lib.default_config()
        full.model = model_cfg
        self._images_fn, self._texts_fn = _jitted(config_lib.to_json(full), self.mesh)
        self.transform = preprocess.eval_transform(model_cfg)
        self.tokenizer = tokenizers.build_tokenizer(model_cfg)
        self.workers = workers or max(1, min(8, os.cpu_count() or 1))

    def _put(self, x: np.ndarray):
        return jax.device_put(x, NamedSharding(self.mesh, P("data")))

    def _run(self, fn: Callable, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Runs `fn` over fixed-size batches, keeping one batch in flight."""
        pending = None
        for x in batches:
            n = len(x)
            out = fn(self.params, self._put(_padded(x, self.batch_size)))
            if pending is not None:
                yield np.asarray(pending[0])[:pending[1]]
            pending = (out, n)
        if pending is not None:
            yield np.asarray(pending[0])[:pending[1]]

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        d = self.model_cfg.embed_dim
        if not texts:
            return np.zeros((0, d), np.float32)
        chunks = (self.tokenizer(texts[i:i + self.batch_size])
                  for i in range(0, len(texts), self.batch_size))
        return np.concatenate(list(self._run(self._texts_fn, chunks)))

    def encode_pixels(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed float32 [N, S, S, 3] images → [N, D]."""
        images = np.asarray(images, np.float32)
        chunks = (images[i:i + self.batch_size] for i in range(0, len(images), self.batch_size))
        out = list(self._run(self._images_fn, chunks))
        return np.concatenate(out) if out else np.zeros((0, self.model_cfg.embed_dim), np.float32)

    def encode_images(self, images: Iterable) -> np.ndarray:
        """Raw images (PIL, uint8 arrays, paths) → [N, D]."""
        out = [emb for emb, _ in self.encode_examples((im, None) for im in images)]
        return np.concatenate(out) if out else np.zeros((0, self.model_cfg.embed_dim), np.float32)

    def encode_examples(self, examples: Iterable[tuple[object, object]],
                        progress=None) -> Iterator[tuple[np.ndarray, list]]:
        """(image, target) pairs → batches of (embeddings [b, D], targets), in order."""
        pool = concurrent.futures.ThreadPoolExecutor(self.workers)
        try:
            batches = self._prepared(examples, pool)
            targets: list[list] = []

            def images():
                for pixels, tgt in batches:
                    targets.append(tgt)
                    yield preprocess.normalize(pixels, self.transform.mean, self.transform.std)

            for emb in self._run(self._images_fn, images()):
                if progress is not None:
                    progress.update(len(emb))
                yield emb, targets.pop(0)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _prepared(self, examples, pool) -> Iterator[tuple[np.ndarray, list]]:
        """uint8 pixel batches, the next batch's decode/resize queued while one is consumed."""
        it = iter(examples)

        def submit():
            chunk = []
            for image, target in it:
                chunk.append((image, target))
                if len(chunk) == self.batch_size:
                    break
            if not chunk:
                return None
            futures = [pool.submit(self.transform.pixels, im) for im, _ in chunk]
            return futures, [t for _, t in chunk]

        nxt = submit()
        while nxt is not None:
            futures, targets = nxt
            nxt = submit()
            yield np.stack([f.result() for f in futures]), targets


def device_summary(mesh: Mesh) -> str:
    d = mesh.devices.flat[0]
    return f"{mesh.devices.size} x {d.platform}:{getattr(d, 'device_kind', '')}"
