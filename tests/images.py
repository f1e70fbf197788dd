"""Encoded test images, shared by the data, eval and gs:// tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def jpeg(rng: np.random.Generator, h: int = 36, w: int = 44, mode: str = "RGB") -> bytes:
    """A random-noise JPEG of h×w (converted to `mode` before encoding)."""
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png(value: int, size: int = 12) -> bytes:
    """A flat size×size PNG of one grey value."""
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()
