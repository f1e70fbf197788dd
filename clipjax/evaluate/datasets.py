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
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from clipjax import imageio, paths
from clipjax.data import idx
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


def _tar_samples(shards: list[str]) -> Iterator[dict[str, bytes]]:
    """Groups consecutive tar members by key (the name up to the first dot); each shard
    is read as one stream (one sequential read on an object store)."""
    for path in shards:
        sample, key = {}, None
        with paths.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = posixpath.basename(member.name)
                k, _, ext = base.partition(".")
                k = posixpath.join(posixpath.dirname(member.name), k)
                if k != key and sample:
                    yield sample
                    sample = {}
                key = k
                sample[ext.lower()] = tar.extractfile(member).read()
            if sample:
                yield sample


def _image_of(sample: dict[str, bytes]) -> bytes | None:
    for ext in ("webp", "jpg", "jpeg", "png", "bmp", "ppm", "tif", "tiff", "gif"):
        if ext in sample:
            return sample[ext]
    return None


def _count_samples(shards: list[str]) -> int:
    return sum(1 for s in _tar_samples_index(shards))


def _tar_samples_index(shards: list[str]) -> Iterator[str]:
    for path in shards:
        with paths.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            keys = []
            for member in tar:
                if member.isfile():
                    k = posixpath.join(posixpath.dirname(member.name),
                                       posixpath.basename(member.name).partition(".")[0])
                    if not keys or keys[-1] != k:
                        keys.append(k)
            yield from keys


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
    first = next(_tar_samples(shards[:1]), {})
    kind = "classification" if "cls" in first else "retrieval"
    if kind == "retrieval" and "txt" not in first:
        raise ClipjaxError(f"{shards[0]}: samples have neither .cls labels nor .txt captions")
    length = _count_samples(shards)

    def examples():
        for sample in _tar_samples(shards):
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
    """A TFDS dataset through `tfds.data_source` (array_record; no TensorFlow needed)."""
    import tensorflow_datasets as tfds

    try:
        ds = tfds.data_source(dataset, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # tfds raises many types for "not prepared here"
        where = data_dir or "the default TFDS data_dir"
        raise ClipjaxError(
            f"TFDS {dataset!r} split {split!r} is not available in {where}: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    classnames = None
    try:
        feature = ds.dataset_info.features[label_key]
        classnames = [n.replace("_", " ") for n in feature.names]
    except Exception:  # no ClassLabel feature: the task must supply class names
        classnames = None

    def examples():
        for i in range(len(ds)):
            ex = ds[i]
            yield np.asarray(ex[image_key]), int(ex[label_key])

    return Source(name, len(ds), examples, classnames=classnames)
