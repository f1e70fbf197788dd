"""Resizing learned position embeddings to another image size or context length.

Fine-tuning at another resolution than the weights were trained at (or with another
text context) needs the learned positions of the new grid. As open_clip's
`resize_pos_embed`: the image grid is resampled bicubically (PIL's a = -0.5 kernel,
antialiased, half-pixel centres: torch's `interpolate(mode='bicubic', antialias=True,
align_corners=False)`), the class token's row kept as it is; the text positions are
resampled linearly (`resize_text_pos_embed`: no antialiasing). Warm start
(`train.init_from`) and `clipjax import` call `resize_params` and log what they resized.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("clipjax")

IMAGE_KEY = "image/positional_embedding"
TEXT_KEY = "text/positional_embedding"


def resize_image_positions(pos, grid: int, extra_tokens: int = 1) -> np.ndarray:
    """[extra + g*g, W] -> [extra + grid*grid, W] (float32): the patch grid resampled
    bicubically, the leading `extra_tokens` rows (the class token) kept."""
    pos = np.asarray(pos, np.float32)
    tok, img = pos[:extra_tokens], pos[extra_tokens:]
    old = math.isqrt(len(img))
    if old * old != len(img):
        raise ValueError(f"{len(img)} patch positions are not a square grid")
    img = img.reshape(old, old, -1)
    out = jax.image.resize(jnp.asarray(img), (grid, grid, img.shape[-1]), "bicubic",
                           antialias=True)
    return np.concatenate([tok, np.asarray(out).reshape(grid * grid, -1)], axis=0)


def resize_text_positions(pos, length: int) -> np.ndarray:
    """[L, W] -> [length, W] (float32), resampled linearly (half-pixel centres)."""
    pos = np.asarray(pos, np.float32)
    out = jax.image.resize(jnp.asarray(pos), (length, pos.shape[-1]), "linear", antialias=False)
    return np.asarray(out)


def resize(key: str, value, shape: tuple[int, ...]) -> np.ndarray | None:
    """`value` (a position embedding at param path `key`) resized to `shape`; None when
    `key` is no position embedding or more than its length differs (the width)."""
    value = np.asarray(value)
    if value.ndim != 2 or len(shape) != 2 or value.shape[1] != shape[1]:
        return None
    if key == IMAGE_KEY:
        grid = math.isqrt(shape[0] - 1)
        if grid * grid != shape[0] - 1:
            return None
        return resize_image_positions(value, grid)
    if key == TEXT_KEY:
        return resize_text_positions(value, shape[0])
    return None


def describe(key: str, old: tuple[int, ...], new: tuple[int, ...]) -> str:
    """A log line's words for one resize: the grid for the image, the length for text."""
    if key == IMAGE_KEY:
        g0, g1 = math.isqrt(old[0] - 1), math.isqrt(new[0] - 1)
        return f"{key}: patch grid {g0}x{g0} -> {g1}x{g1} (bicubic, class token kept)"
    return f"{key}: context {old[0]} -> {new[0]} (linear)"


def is_resizable(key: str) -> bool:
    return key in (IMAGE_KEY, TEXT_KEY)


def resize_params(source: dict[str, Any], target_shapes: dict[str, tuple[int, ...]]
                  ) -> tuple[dict[str, Any], list[str]]:
    """Flat {path: array} with every position embedding whose length differs from
    `target_shapes` resized; also the log lines of what changed."""
    out, lines = dict(source), []
    for k, v in source.items():
        want = target_shapes.get(k)
        if want is None or tuple(np.shape(v)) == tuple(want) or not is_resizable(k):
            continue
        new = resize(k, jax.device_get(v), tuple(want))
        if new is not None:
            out[k] = new.astype(np.asarray(jax.device_get(v)).dtype)
            lines.append(describe(k, tuple(np.shape(v)), tuple(want)))
    return out, lines
