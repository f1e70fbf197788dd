"""Evaluation data sources: IDX files, class folders, CLIP_benchmark webdataset, TFDS.

Each source is an iterable of `(image, target)` with a length: `image` is a
PIL image or a uint8 array, `target` a class index (classification) or a list
of captions (retrieval). A source may carry its own `classnames` and
`templates` (CLIP_benchmark's `wds/` layout ships both; TFDS names its labels).
Evaluation reads every example once, in order; nothing here shuffles.

Every path goes through `clipjax.paths`: data directories may be relative,
absolute or a URI (`gs://...`); tar shards are streamed, not downloaded whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from clipjax import imageio, paths
from clipjax.data import idx, tfds_reader
from clipjax.data import webdataset as wds
from clipjax.errors import ClipjaxError


@dataclass
class Source:
    """A finite, ordered evaluation set."""

    name: str
    length: int
    examples: object  # a callable returning a fresh iterator of (image, target)
    classnames: list[str] | None = None
    templates: list[str] | None = None
    kind: str = "classification"  # classification | retrieval
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[object, object]]:
        return iter(self.examples())


def decode(image) -> Image.Image | np.ndarray:
    """Bytes → PIL image (an unreadable one raises `imageio.UnreadableImage`); arrays and
    PIL images pass through. The evaluator's sources hand it encoded bytes and paths
    instead, decoded on its worker threads, where an unreadable image is skipped."""
    if isinstance(image, bytes | bytearray | memoryview):
        return imageio.decode(bytes(image), rgb=False)
    return image


# --------------------------------------------------------------------------- IDX

def idx_source(data_dir: str, split: str = "test", name: str = "idx") -> Source:
    """MNIST-style `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` files."""
    images, labels = idx.load_split(data_dir, split)
    return Source(name, len(labels), lambda: zip(images, labels.tolist(), strict=True))


# --------------------------------------------------------------------------- class folders


def _images_in(directory: str) -> list[str]:
    return [os.fspath(paths.join(directory, f))
            for f in imageio.list_images(directory, recursive=False)]


def subdirs(directory: str) -> list[str]:
    """Names of the sub-directories of `directory`, sorted."""
    return [d for d in paths.listdir(directory) if paths.is_dir(paths.join(directory, d))]


def open_image(path: str) -> Image.Image:
    """A decoded PIL image of a local or remote file."""
    return imageio.read(path, rgb=False)


def folder_source(root: str, name: str = "folder") -> Source:
    """ROOT/<class>/*.jpg: classes in sorted folder order; names from the folder names."""
    if not paths.is_dir(root):
        raise ClipjaxError(f"{root}: not a directory")
    classes = subdirs(root)
    if not classes:
        raise ClipjaxError(f"{root}: no class subfolders")
    items = [(path, label) for label, c in enumerate(classes)
             for path in _images_in(os.fspath(paths.join(root, c)))]
    if not items:
        raise ClipjaxError(f"{root}: no images in its class subfolders")

    # Paths: the evaluator's workers decode them (and skip an unreadable one).
    names = [c.replace("_", " ") for c in classes]
    return Source(name, len(items), lambda: iter(items), classnames=names)


def caption_folder_source(root: str, name: str = "captions") -> Source:
    """ROOT/KEY.jpg + ROOT/KEY.txt (one caption per line): a retrieval set."""
    if not paths.is_dir(root):
        raise ClipjaxError(f"{root}: not a directory")
    items = []
    for path in _images_in(root):
        txt = os.path.splitext(path)[0] + ".txt"
        if paths.exists(txt):
            caps = [c.strip() for c in paths.read_text(txt).splitlines() if c.strip()]
            if caps:
                items.append((path, caps))
    if not items:
        raise ClipjaxError(f"{root}: no image with a non-empty .txt caption file")

    return Source(name, len(items), lambda: iter(items), kind="retrieval")


# --------------------------------------------------------------------------- webdataset


def _read_lines(path: str) -> list[str] | None:
    if not paths.exists(path):
        return None
    return [line.strip() for line in paths.read_text(path).splitlines() if line.strip()]


def tar_samples(shards: list[str], wanted=None):
    """{ext: bytes} of every sample of the shards in order, one sequential read per shard;
    an unreadable shard or a cut-short sample is an error (an evaluation set must be whole)."""
    for path in shards:
        for key, members, error in wds.stream_shard(path, wanted):
            if error:
                raise ClipjaxError(f"{path}: {error.replace('_', ' ')}"
                                   + (f" (sample {key!r})" if key else ""))
            yield members


def _image_of(sample: dict[str, bytes]) -> bytes | None:
    return next((sample[e] for e in imageio.IMAGE_SUFFIXES if e in sample), None)


def _count_samples(shards: list[str]) -> int:
    """From `sizes.json` when the shards have one, else from the tar headers (locally a
    seek from header to header, not a read of the images)."""
    sizes, skipped = wds.shard_sizes(shards)
    if skipped:
        raise ClipjaxError(f"{shards[0].rsplit('/', 1)[0]}: {sum(skipped.values())} "
                           "unreadable shard(s)")
    return sum(sizes)


def wds_source(root: str, split: str = "test", name: str = "wds") -> Source:
    """CLIP_benchmark's layout: ROOT/{classnames.txt, zeroshot_classification_templates.txt,
    SPLIT/*.tar}; samples hold an image plus `.cls` (class index) or `.txt` (captions)."""
    shards = paths.glob(paths.join(root, split, "*.tar"))
    if not shards:
        raise ClipjaxError(f"{root}: no {split}/*.tar shards (CLIP_benchmark wds layout)")
    classnames = _read_lines(os.fspath(paths.join(root, "classnames.txt")))
    templates = _read_lines(os.fspath(paths.join(root,
                                                 "zeroshot_classification_templates.txt")))
    if templates:
        from clipjax.evaluate.prompts import normalize_templates

        templates = normalize_templates(templates)
    first = next(tar_samples(shards[:1]), {})
    kind = "classification" if "cls" in first else "retrieval"
    if kind == "retrieval" and "txt" not in first:
        raise ClipjaxError(f"{shards[0]}: samples have neither .cls labels nor .txt captions")
    length = _count_samples(shards)

    def examples():
        for sample in tar_samples(shards):
            image = _image_of(sample)
            if image is None:
                raise ClipjaxError(f"{root}/{split}: a sample without an image: {sorted(sample)}")
            if kind == "classification":
                yield image, int(sample["cls"].decode().strip())  # bytes, decoded later
            else:
                caps = [c.strip() for c in sample["txt"].decode("utf-8").splitlines()]
                yield image, [c for c in caps if c]

    return Source(name, length, examples, classnames=classnames, templates=templates, kind=kind)


# --------------------------------------------------------------------------- TFDS


def tfds_source(dataset: str, split: str = "test", data_dir: str = "",
                name: str = "tfds", image_key: str = "image",
                label_key: str = "label") -> Source:
    """A prepared TFDS dataset (`clipjax.data.tfds_reader`, as training reads it): images
    stay encoded until the evaluator's workers decode them, so a bad one is counted."""
    ds = tfds_reader.open_source(dataset, split, data_dir, image_key)
    classnames = tfds_reader.class_names(ds, label_key)

    def examples():
        for i in range(len(ds)):
            ex = ds[i]
            yield tfds_reader.encoded_image(ex, image_key), int(ex[label_key])

    return Source(name, len(ds), examples, classnames=classnames)
