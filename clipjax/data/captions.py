"""Captions for classification data: class names through prompt templates.

Training on a labelled set (Fashion-MNIST, an ImageNet-style folder) needs text;
CLIP-style templates ("a photo of a {}.") turn each label into a caption. The
template is drawn per sample from a seeded generator, so it is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clipjax.errors import ClipjaxError

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a close-up photo of a {}.",
    "a good photo of a {}.",
    "a photo of the {}.",
    "a cropped photo of a {}.",
)


def check_templates(templates: Sequence[str] | None) -> tuple[str, ...]:
    """The given templates (or the defaults), each with exactly one '{}'."""
    out = tuple(templates) if templates else DEFAULT_TEMPLATES
    for t in out:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ClipjaxError(f"caption template {t!r} must contain exactly one '{{}}'")
    return out


def clean_classname(name: str) -> str:
    """Folder and TFDS names use underscores: 'ankle_boot' -> 'ankle boot'."""
    return " ".join(str(name).replace("_", " ").split())


def class_captions(classname: str, templates: Sequence[str]) -> list[str]:
    """Every template applied to one class name."""
    return [t.format(classname) for t in templates]


def pick_template_caption(classname: str, templates: Sequence[str],
                          rng: np.random.Generator) -> str:
    return templates[int(rng.integers(len(templates)))].format(classname)
