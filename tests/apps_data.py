"""Fixtures for the apps tests: a tiny random CLIP and a folder of real photos
(scikit-image's bundled ones)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

# Colour and greyscale photos that ship with scikit-image.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "horse", "coins", "moon",
          "hubble_deep_field", "immunohistochemistry", "retina", "page")


def tiny_config(embed_dim: int = 32):
    from clipjax.config import default_config

    c = default_config()
    c.model.embed_dim = embed_dim
    c.model.image.image_size = 32
    c.model.image.patch_size = 8
    c.model.image.width = 32
    c.model.image.layers = 1
    c.model.image.heads = 2
    c.model.text.context_length = 16
    c.model.text.width = 32
    c.model.text.heads = 2
    c.model.text.layers = 1
    return c


def tiny_model(seed: int = 0, config=None):
    import jax

    from clipjax import models
    from clipjax.inference import ClipModel

    config = config or tiny_config()
    params = models.init_params(config.model, jax.random.key(seed))
    return ClipModel.from_params(config, params)


def photo(name: str) -> np.ndarray:
    import skimage.data

    return np.asarray(getattr(skimage.data, name)())


def write_photos(folder: str, names=PHOTOS, *, nested: bool = True) -> list[str]:
    """Saves the photos (≤256 px; PNG, one JPEG in three, half in a sub-folder); returns
    their sorted absolute paths."""
    paths = []
    for i, name in enumerate(names):
        sub = os.path.join(folder, "more") if nested and i % 2 else folder
        os.makedirs(sub, exist_ok=True)
        ext = ".jpg" if i % 3 == 0 else ".png"
        path = os.path.join(sub, name + ext)
        image = Image.fromarray(photo(name))
        image.thumbnail((256, 256))  # small files keep the tests fast; content stays real
        if ext == ".jpg" and image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        image.save(path)
        paths.append(os.path.abspath(path))
    return sorted(paths)


def write_corrupt(folder: str) -> list[str]:
    """A truncated JPEG and a text file named .png; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    good = os.path.join(folder, "_tmp.jpg")
    Image.fromarray(photo("astronaut")).save(good)
    data = open(good, "rb").read()
    os.remove(good)
    truncated = os.path.join(folder, "truncated.jpg")
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 3])
    fake = os.path.join(folder, "notes.png")
    with open(fake, "w") as f:
        f.write("this is not an image\n")
    return sorted([os.path.abspath(truncated), os.path.abspath(fake)])
