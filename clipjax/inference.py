"""`clipjax.load(path)` and `ClipModel`: a trained or imported CLIP as numpy in, numpy out.

A `ClipModel` holds the params, the model's tokenizer and its preprocessing,
and encodes in fixed-shape batches: the last batch is padded, and the batch
size is the smaller of `batch_size` and the next power of two above the
input count, so a jitted encoder compiles once per shape and a handful of
shapes cover every input size. With several local devices each batch is
split over them (a 1-axis mesh; params replicated). Host-side preprocessing
of the next batch overlaps the device's work on the current one.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from clipjax import threaded
from clipjax.errors import ClipjaxError

DEFAULT_BATCH_SIZE = 64


def load(path: str | os.PathLike, step: int | None = None, *, params: str = "raw",
         **kwargs) -> ClipModel:
    """The model in a workdir (latest or `step`) or in WORKDIR/checkpoints/STEP;
    `params="ema"` takes the params' moving average (a run with train.ema_decay > 0).

    `path` may be relative (to the current directory), absolute or a URI
    (`gs://bucket/run`); `model.workdir` is the resolved one. `kwargs` go to
    `ClipModel` (e.g. `batch_size`, `devices`).
    """
    from clipjax import checkpoint

    workdir, step = checkpoint.resolve(os.fspath(path), step)
    config = checkpoint.read_config(workdir)
    weights = checkpoint.restore_params(workdir, step, which=params)
    model = ClipModel(config, weights, **kwargs)
    model.workdir, model.step, model.params_kind = workdir, step, params
    return model


class ClipModel:
    """A CLIP model ready to embed images and texts (L2-normalised float32 numpy arrays)."""

    workdir: str | None = None
    step: int | None = None
    params_kind: str = "raw"  # which params `load` took: raw | ema

    def __init__(self, config: ConfigDict, params: Any, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 devices: Sequence[Any] | None = None, workers: int | None = None):
        import jax
        from flax.linen import meta

        from clipjax import config as config_lib
        from clipjax import models
        from clipjax.config import model_only
        from clipjax.data.preprocess import eval_transform

        if "model" not in config:  # a bare model section
            config = model_only(ConfigDict({"model": config}))
        self.config = config
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ClipjaxError(f"batch_size must be positive; got {batch_size}")
        self.devices = list(devices or jax.local_devices())
        self.workers = workers or min(8, os.cpu_count() or 1)
        self._model_key = config_lib.to_json(model_only(config))
        self.module = models.build_model(config.model)
        params = meta.unbox(params)
        _check_params(self._model_key, params)
        self._mesh = _mesh(tuple(d.id for d in self.devices))
        replicated = jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec())
        self.params = jax.device_put(params, replicated)
        # Batches go to the devices explicitly: in a multi-process job (`data score` on a
        # pod) jit refuses host numpy for a sharded argument, even over local devices only.
        self._batch_sharding = jax.sharding.NamedSharding(
            self._mesh, jax.sharding.PartitionSpec("data"))
        self.preprocess = eval_transform(config.model)

    @classmethod
    def from_params(cls, config: ConfigDict, params: Any, **kwargs) -> ClipModel:
        """A ClipModel over in-memory params; `config` is a full config or its `model` section."""
        return cls(config, params, **kwargs)

    # ------------------------------------------------------------------ properties

    @property
    def model_config(self) -> ConfigDict:
        return self.config.model

    @property
    def embed_dim(self) -> int:
        return int(self.config.model.embed_dim)

    @property
    def image_size(self) -> int:
        return int(self.config.model.image.image_size)

    @property
    def context_length(self) -> int:
        return int(self.config.model.text.context_length)

    @property
    def logit_scale(self) -> float:
        """The learned log-temperature (open_clip's `logit_scale`); logits use its exp()."""
        return float(self.params["logit_scale"])

    @property
    def logit_bias(self) -> float | None:
        bias = self.params.get("logit_bias")
        return None if bias is None else float(bias)

    @functools.cached_property
    def tokenizer(self):
        """The model's tokenizer (built on first use: image-only work needs no vocab file)."""
        from clipjax.data.tokenizers import build_tokenizer

        return build_tokenizer(self.config.model)

    # ------------------------------------------------------------------ encoding

    def encode_images(self, images, batch_size: int | None = None) -> np.ndarray:
        """Images → float32 [N, embed_dim], L2-normalised.

        `images`: uint8 [N, H, W, 3] (preprocessed with the model's recipe), a list
        of PIL images / file paths / uint8 arrays (each preprocessed), or float
        [N, S, S, 3] taken as already preprocessed. One PIL image or path gives [1, D].
        """
        s = self.image_size
        if _is_single_image(images):
            images = [images]
        if _is_array(images) and np.asarray(images).dtype != np.uint8:
            array = np.asarray(images, dtype=np.float32)
            if array.ndim != 4 or array.shape[1:] != (s, s, 3):
                raise ClipjaxError(
                    f"float images are taken as preprocessed and must be [N, {s}, {s}, 3]; "
                    f"got {tuple(array.shape)}")
            return self._encode(self._image_fn, array, batch_size, lambda chunk: chunk)
        if _is_array(images):
            array = np.asarray(images)
            if array.ndim != 4 or array.shape[-1] != 3:
                raise ClipjaxError(
                    f"uint8 images must be [N, H, W, 3]; got {tuple(array.shape)}")
            if array.shape[1:3] == (s, s):  # resize and crop are no-ops: normalise only
                return self._encode(self._image_fn, array, batch_size, self.preprocess.batch)
            return self._encode(self._image_fn, array, batch_size, self._preprocess_list)
        items = list(images)
        return self._encode(self._image_fn, items, batch_size, self._preprocess_list)

    def encode_texts(self, texts, batch_size: int | None = None) -> np.ndarray:
        """Texts → float32 [N, embed_dim], L2-normalised.

        `texts`: a string, a list of strings (tokenized with the model's
        tokenizer), or int token ids [N, L] with L <= context_length (the text tower runs
        on the first L positions: with causal attention and argmax or first pooling, any
        L past the pooled token gives the same embedding, at less cost).
        """
        if isinstance(texts, str):
            texts = [texts]
        if _is_array(texts):
            ids = np.asarray(texts)
            if ids.ndim != 2 or not 1 <= ids.shape[1] <= self.context_length \
                    or not np.issubdtype(ids.dtype, np.integer):
                raise ClipjaxError(
                    f"token ids must be int [N, {self.context_length}] (or fewer positions); got "
                    f"{ids.dtype} {tuple(ids.shape)}")
            return self._encode(self._text_fn, ids.astype(np.int32), batch_size, lambda c: c)
        return self._encode(self._text_fn, list(texts), batch_size, self.tokenizer)

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        return self.tokenizer(texts)

    # ------------------------------------------------------------------ applications
    # (implemented in clipjax.apps; these delegate)

    def classify(self, images, labels: Sequence[str], templates=None, **kwargs):
        """Zero-shot predictions (top-k labels, probabilities) per image; kwargs: top_k,
        threshold, none_label. See `clipjax.apps.classify.classify`."""
        from clipjax.apps.classify import classify

        return classify(self, images, labels, templates, **kwargs)

    def search(self, index, query, k: int = 10):
        """Top-k hits (path, cosine) of an embedding cache (ImageIndex or its directory)
        for a text, image or vector query. See `clipjax.apps.search.search`."""
        from clipjax.apps.search import search

        return search(self, index, query, k)

    def score(self, images, texts, **kwargs):
        """CLIPScore (2.5 · max(cos, 0)) of image i with text i, and the mean. See
        `clipjax.apps.clipscore.score`."""
        from clipjax.apps.clipscore import score

        return score(self, images, texts, **kwargs)

    # ------------------------------------------------------------------ internals

    def _preprocess_list(self, items: list) -> np.ndarray:
        from clipjax.data.preprocess import normalize

        pixels = threaded.map_ordered(self.preprocess.pixels, items, self.workers)
        return normalize(np.stack(pixels), self.preprocess.mean, self.preprocess.std)

    def batch_for(self, n: int, batch_size: int | None = None) -> int:
        """min(batch_size, next power of two >= n), rounded up to a multiple of the devices."""
        limit = int(batch_size or self.batch_size)
        if limit < 1:
            raise ClipjaxError(f"batch_size must be positive; got {limit}")
        b = min(limit, 1 << max(n - 1, 0).bit_length())
        d = len(self.devices)
        return -(-b // d) * d

    def _encode(self, fn: Callable, inputs, batch_size: int | None,
                prepare: Callable[[Any], np.ndarray]) -> np.ndarray:
        """Runs `fn` over fixed-size batches of `prepare(inputs[i:i+b])`, one batch in flight."""
        import jax

        n = len(inputs)
        if n == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        b = self.batch_for(n, batch_size)
        out = np.empty((n, self.embed_dim), np.float32)
        pending = None
        for start in range(0, n, b):
            chunk = np.asarray(prepare(inputs[start:start + b]))
            count = len(chunk)
            if count < b:  # pad the last batch so the compiled shape is reused
                pad = np.zeros((b - count, *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            chunk = jax.device_put(chunk, self._batch_sharding)
            result = fn(self.params, chunk)  # dispatched asynchronously
            if pending is not None:
                _store(out, *pending)
            pending = (start, count, result)
        _store(out, *pending)
        return out

    @functools.cached_property
    def _image_fn(self) -> Callable:
        return _encoder(self._model_key, self._mesh, "image")

    @functools.cached_property
    def _text_fn(self) -> Callable:
        return _encoder(self._model_key, self._mesh, "text")

    def __repr__(self) -> str:
        m = self.config.model
        tower = f"vit/{m.image.patch_size}" if m.image.kind == "vit" else "resnet"
        where = f", workdir={self.workdir!r}, step={self.step}" if self.workdir else ""
        return (f"ClipModel({tower} {m.image.image_size}px, text {m.text.context_length} "
                f"tokens, embed_dim={m.embed_dim}{where})")


def _store(out: np.ndarray, start: int, count: int, result) -> None:
    out[start:start + count] = np.asarray(result)[:count]


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _is_single_image(x) -> bool:
    from PIL import Image

    return isinstance(x, Image.Image | str | os.PathLike)


@functools.lru_cache(maxsize=8)
def _mesh(device_ids: tuple[int, ...]):
    import jax

    from clipjax import sharding

    by_id = {d.id: d for d in jax.devices()}
    return sharding.device_mesh([by_id[i] for i in device_ids])


# Jitted encoders are shared by every ClipModel of the same architecture and
# devices, so a second model (another checkpoint of a run) reuses the compiles.
@functools.lru_cache(maxsize=16)
def _encoder(model_key: str, mesh, tower: str) -> Callable:
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from clipjax import config as config_lib
    from clipjax import models

    module = models.build_model(config_lib.from_json(model_key).model)

    def apply(params, x):
        if tower == "image":
            return module.apply({"params": params}, x, method=lambda m, v: m.encode_image(v))
        return module.apply({"params": params}, x, method=lambda m, t: m.encode_text(t))

    batch = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(apply, in_shardings=(replicated, batch), out_shardings=batch)


@functools.lru_cache(maxsize=8)
def _expected_shapes(model_key: str) -> dict[str, tuple[int, ...]]:
    from flax.linen import meta

    from clipjax import config as config_lib
    from clipjax import models

    abstract = meta.unbox(models.abstract_params(config_lib.from_json(model_key).model))
    return {k: tuple(v.shape) for k, v in _flat(abstract)}


def _check_params(model_key: str, params: Any) -> None:
    """Params must have the tree and shapes the config's model makes; names the first misfit."""
    import jax

    want = _expected_shapes(model_key)
    have = dict(_flat(params))
    for key in sorted(want.keys() - have.keys()):
        raise ClipjaxError(f"params lack {key!r}, which the config's model needs")
    for key in sorted(have.keys() - want.keys()):
        raise ClipjaxError(f"params have {key!r}, which the config's model does not know")
    for key, shape in want.items():
        got = tuple(jax.numpy.shape(have[key]))
        if got != shape:
            raise ClipjaxError(
                f"param {key!r} has shape {got}; the config's model needs {shape}")


def _flat(tree, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(tree, dict) or hasattr(tree, "items"):
        for k, v in tree.items():
            yield from _flat(v, f"{prefix}{k}/")
    else:
        yield prefix.rstrip("/"), tree
