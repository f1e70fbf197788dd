"""Training augmentation: random resized crop (torchvision's sampling) and horizontal flip.

The crop box is drawn exactly as torchvision's `RandomResizedCrop.get_params`
draws it (10 tries, then a centre crop clipped to the ratio range), so a
clipjax run augments like open_clip's `image_transform(is_train=True)`; the
crop and the bicubic resize happen in one PIL call.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from clipjax.data.decode import BadSample, load_rgb

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def crop_box(width: int, height: int, scale, ratio, rng: np.random.Generator):
    """(left, top, w, h) of a random crop covering `scale` of the area at aspect in `ratio`."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    w, h = max(w, 1), max(h, 1)  # torchvision would return an empty box here
    return (width - w) // 2, (height - h) // 2, w, h


def draft_size(width: int, height: int, size: int, scale, ratio) -> tuple[int, int] | None:
    """The smallest JPEG decode size that still leaves the smallest possible crop >= size."""
    area = width * height
    smallest = min(math.sqrt(scale[0] * area / max(ratio)), math.sqrt(scale[0] * area * min(ratio)))
    f = size / max(smallest, 1.0)
    if f >= 0.5:  # JPEG can only shrink by 1/2, 1/4, 1/8
        return None
    return math.ceil(width * f), math.ceil(height * f)


class RandomResizedCrop:
    """Opened (not yet decoded) PIL image -> uint8 [size, size, 3], randomly cropped."""

    def __init__(self, size: int, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = False,
                 interpolation: str = "bicubic"):
        if not (0 < scale[0] <= scale[1] <= 1.0):
            raise ValueError(f"crop scale {tuple(scale)} must satisfy 0 < lo <= hi <= 1")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"crop ratio {tuple(ratio)} must satisfy 0 < lo <= hi")
        self.size = int(size)
        self.scale = tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)
        self.flip = flip
        self.resample = _RESAMPLE[interpolation]

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        draft = None
        if img.format == "JPEG":
            draft = draft_size(*img.size, self.size, self.scale, self.ratio)
        img = load_rgb(img, draft)
        left, top, w, h = crop_box(*img.size, self.scale, self.ratio, rng)
        try:
            out = img.resize((self.size, self.size), self.resample,
                             box=(left, top, left + w, top + h))
        except Exception as e:  # noqa: BLE001 - lazily decoded data can fail here too
            raise BadSample("decode_error", f"{type(e).__name__}: {e}") from None
        if self.flip and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(out, dtype=np.uint8)
