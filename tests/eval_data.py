"""Small on-disk fixtures for the evaluator tests: IDX files and tiny-model workdirs."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np


def write_idx(path: str, array: np.ndarray) -> None:
    """Writes a uint8 array in the IDX format (gzipped when the name ends in .gz)."""
    array = np.ascontiguousarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def write_idx_split(directory: str, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """`{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`, as the MNIST family ships."""
    os.makedirs(directory, exist_ok=True)
    prefix = {"train": "train", "test": "t10k"}[split]
    write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), images)
    write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), labels)


def tiny_config(train_steps: int = 1000):
    from clipjax.config import default_config

    c = default_config()
    c.model.embed_dim = 16
    c.model.image.image_size = 16
    c.model.image.patch_size = 8
    c.model.image.width = 32
    c.model.image.layers = 1
    c.model.image.heads = 2
    c.model.text.context_length = 16
    c.model.text.width = 32
    c.model.text.heads = 2
    c.model.text.layers = 1
    c.train.steps = train_steps
    return c


def random_params(model_cfg, seed: int = 0):
    """Random params of the right tree and shapes, made in numpy: no init compilation."""
    import jax
    from flax import linen as nn

    from clipjax import models

    rng = np.random.default_rng(seed)
    shapes = nn.meta.unbox(models.abstract_params(model_cfg))

    def make(path, s):
        x = rng.normal(size=s.shape) * 0.05
        if str(path[-1]).find("scale") >= 0:  # LayerNorm gains (and the logit scale) near 1
            x = x + 1.0
        return x.astype(s.dtype)

    return jax.tree_util.tree_map_with_path(make, shapes)


def save_tiny(workdir: str, step: int, config=None, seed: int = 0) -> None:
    """A params-only checkpoint of a random tiny CLIP (what `clipjax import` writes)."""
    from clipjax import checkpoint

    config = config or tiny_config()
    checkpoint.save_params(workdir, random_params(config.model, seed + step), config, step=step)
