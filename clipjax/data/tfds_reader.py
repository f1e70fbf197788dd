"""The one way clipjax opens a TFDS dataset: `tfds.data_source` (array_record, random
access, no TensorFlow), images left encoded so every reader decodes them through
`clipjax.imageio` (bomb guard, EXIF, RGB; an unreadable one is skipped and counted)."""

from __future__ import annotations

import numpy as np

from clipjax import paths
from clipjax.data.captions import clean_classname
from clipjax.errors import ClipjaxError


def open_source(name: str, split: str, data_dir: str = "", image_key: str = "image"):
    """A prepared dataset's split; never downloads. `data_dir` local (made absolute:
    grain workers may start elsewhere) or gs:// (tfds reads it through its own layer)."""
    import tensorflow_datasets as tfds

    data_dir = paths.canonical(data_dir) if data_dir else None
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as e:  # tfds raises many types for "not prepared here"
        said = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ClipjaxError(f"tfds dataset {name!r} split {split!r} is not readable from "
                           f"{data_dir or 'the default TFDS data_dir'}: {said}") from None


def class_names(ds, label_key: str) -> list[str] | None:
    """The ClassLabel names of `label_key` as words ('ankle_boot' -> 'ankle boot'), None
    when the feature has none."""
    features = ds.dataset_info.features
    feature = features[label_key] if label_key in features else None
    names = getattr(feature, "names", None)
    return [clean_classname(n) for n in names] if names else None


def encoded_image(example: dict, image_key: str):
    """The image of one example as its encoded bytes (SkipDecoding gives a 0-d object
    array or bytes), or whatever else the feature holds."""
    image = example.get(image_key)
    if isinstance(image, np.ndarray) and image.dtype == object:
        image = image.item()
    return image
