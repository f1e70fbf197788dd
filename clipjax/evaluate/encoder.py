"""Streaming image embedding for the evaluator, over `clipjax.inference.ClipModel`.

ClipModel does the sharded, jitted, fixed-shape batch encoding (its compiled
encoders are shared by every checkpoint of one architecture, so a `--watch`
job compiles once). This module feeds it from a dataset iterator: decode,
resize and crop of the next batch run in threads while the devices encode the
current one, and only one batch of pixels is held at a time.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Iterable, Iterator, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from clipjax import checkpoint as checkpoint_lib
from clipjax import imageio, models, sharding, threaded
from clipjax.data import preprocess
from clipjax.inference import ClipModel


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    return sharding.device_mesh(devices)


def abstract_params(model_cfg: ConfigDict, mesh: Mesh):
    """ShapeDtypeStructs of the params, replicated on `mesh` (the restore target)."""
    shapes = nn.meta.unbox(models.abstract_params(model_cfg))
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                        shapes)


def restore(workdir: str, step: int, model_cfg: ConfigDict, mesh: Mesh, which: str = "raw"):
    """The params of one checkpoint (`which='ema'`: their EMA), placed on the evaluator's
    mesh (that item only)."""
    return checkpoint_lib.restore_params(workdir, step, abstract_params(model_cfg, mesh),
                                         which=which)


class Encoder:
    """One model's embeddings of texts and of a stream of (image, target) examples."""

    def __init__(self, config: ConfigDict, params, *, batch_size: int = 256,
                 mesh: Mesh | None = None, workers: int | None = None):
        self.mesh = mesh or make_mesh()
        devices = list(self.mesh.devices.flat)
        n = len(devices)
        self.batch_size = max(n, -(-int(batch_size) // n) * n)  # a multiple of the devices
        self.model = ClipModel(config, params, batch_size=self.batch_size, devices=devices)
        self.embed_dim = self.model.embed_dim
        self.transform = self.model.preprocess
        self.workers = workers or max(1, min(8, os.cpu_count() or 1))
        self.skipped: list[imageio.UnreadableImage] = []  # since the last take_skipped()

    def take_skipped(self) -> list[imageio.UnreadableImage]:
        """The unreadable images met since the last call (left out of every batch)."""
        out, self.skipped = self.skipped, []
        return out

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.encode_texts(list(texts))

    def encode_images(self, images: Iterable) -> np.ndarray:
        """Raw images (PIL, uint8 arrays, paths) → [N, D]."""
        out = [emb for emb, _ in self.encode_examples((im, None) for im in images)]
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    def encode_examples(self, examples: Iterable[tuple[object, object]],
                        progress=None) -> Iterator[tuple[np.ndarray, list]]:
        """(image, target) pairs → batches of (embeddings [b, D], targets), in order.
        An image that cannot be read is left out with its target and kept in
        `self.skipped`, as training skips and counts a bad sample."""
        pool = concurrent.futures.ThreadPoolExecutor(self.workers)
        try:
            for pixels, targets in self._prepared(examples, pool):
                images = preprocess.normalize(pixels, self.transform.mean, self.transform.std)
                emb = self.model.encode_images(images)
                if progress is not None:
                    progress.update(len(emb))
                yield emb, targets
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _prepared(self, examples, pool) -> Iterator[tuple[np.ndarray, list]]:
        """uint8 pixel batches; the next batch's decode/resize is queued before one is used."""
        def prepare(example):
            return self._pixels(example[0]), example[1]

        for done, _ in threaded.map_batches(prepare, examples, self.batch_size, pool):
            self.skipped.extend(p for p, _ in done if isinstance(p, imageio.UnreadableImage))
            kept = [(p, t) for p, t in done if not isinstance(p, imageio.UnreadableImage)]
            if kept:
                yield np.stack([p for p, _ in kept]), [t for _, t in kept]

    def _pixels(self, image) -> np.ndarray | imageio.UnreadableImage:
        """uint8 pixels of an image (PIL, array, encoded bytes or a path), or why not."""
        try:
            if isinstance(image, bytes | bytearray | memoryview):
                image = imageio.decode(bytes(image), rgb=False)
            elif isinstance(image, str | os.PathLike):
                image = imageio.read(image, rgb=False)
            return self.transform.pixels(image)
        except imageio.UnreadableImage as e:
            return e


def device_summary(mesh: Mesh) -> str:
    d = mesh.devices.flat[0]
    return f"{mesh.devices.size} x {d.platform}:{getattr(d, 'device_kind', '')}"
