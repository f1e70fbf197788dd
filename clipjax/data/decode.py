"""Decoding one sample's image and caption, with every failure named.

Web data is dirty: truncated JPEGs, zero-byte files, PNG headers declaring
hundreds of megapixels, captions in Latin-1. Each problem raises `BadSample`
with a short reason; the pipeline counts reasons instead of dying.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from clipjax import imageio
from clipjax.imageio import to_rgb


class BadSample(Exception):
    """A sample to skip; `reason` is the counter it goes to."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def open_image(data: bytes | None, max_pixels: int) -> Image.Image:
    """Opens encoded bytes lazily, checking the declared size before any pixel is decoded."""
    try:
        return imageio.open_bytes(data, max_pixels=max_pixels)
    except imageio.UnreadableImage as e:
        raise BadSample(e.reason, e.detail) from None


def load_rgb(img: Image.Image, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decodes the pixels (optionally at a reduced JPEG scale) and converts to RGB."""
    try:
        return imageio.load(img, draft_size=draft_size)
    except imageio.UnreadableImage as e:
        raise BadSample(e.reason, e.detail) from None


def decode_image(data: bytes | None, max_pixels: int) -> Image.Image:
    """Encoded bytes -> an RGB PIL image, or BadSample."""
    return load_rgb(open_image(data, max_pixels))


def array_image(arr: np.ndarray) -> Image.Image:
    """A uint8 [H,W], [H,W,1], [H,W,3] or [H,W,4] array -> RGB PIL image."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise BadSample("decode_error", f"image array dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise BadSample("decode_error", f"image array shape {arr.shape}")
    return to_rgb(Image.fromarray(arr))


def caption_candidates(text, *, split_lines: bool = False) -> list[str]:
    """Raw caption (bytes, str, or a list of them) -> the non-empty candidate captions."""
    if text is None:
        raise BadSample("missing_caption")
    items: Sequence = text if isinstance(text, list | tuple | np.ndarray) else [text]
    out = []
    for t in items:
        if isinstance(t, bytes | np.bytes_):
            try:
                t = bytes(t).decode("utf-8")
            except UnicodeDecodeError:
                raise BadSample("caption_not_utf8") from None
        t = str(t)
        parts = t.splitlines() if split_lines else [t]
        out.extend(" ".join(p.split()) for p in parts)
    out = [t for t in out if t]
    if not out:
        raise BadSample("empty_caption")
    return out


def pick_caption(candidates: list[str], choice: str, rng: np.random.Generator) -> str:
    if choice == "first" or len(candidates) == 1:
        return candidates[0]
    return candidates[int(rng.integers(len(candidates)))]
