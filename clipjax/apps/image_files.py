"""Finding image files under a path or glob, and opening them without letting a
bad file stop a run.

An unreadable image (truncated, not an image, a decompression bomb) becomes an
`UnreadableImage` with the reason; callers skip and list it.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from clipjax import imageio, threaded
from clipjax import paths as paths_lib
from clipjax.errors import ClipjaxError
from clipjax.imageio import UnreadableImage, is_image_file

__all__ = ["UnreadableImage", "find_images", "is_image_file", "iter_batches", "load_pixels",
           "open_image", "require_local"]

GLOB_CHARS = frozenset("*?[")


def require_local(path, what: str = "images") -> None:
    """A ClipjaxError for a URI: images, image folders and patterns must be local."""
    if paths_lib.is_remote(path):
        raise ClipjaxError(
            f"{os.fspath(path)}: {what} are read from local files only (a bucket can hold "
            "the embedding cache and the model, not the images to embed); copy them to "
            "local disk first, e.g. `gcloud storage cp -r URI DIR`")


def find_images(specs: str | Sequence[str], *, recursive: bool = True) -> list[str]:
    """Absolute paths of the image files named by `specs`, sorted, without duplicates.

    Each spec is a file (taken whatever its extension), a directory (searched
    recursively for image extensions) or a glob pattern (`**` recurses).
    """
    if isinstance(specs, str | os.PathLike):
        specs = [specs]
    found: set[str] = set()
    for spec in specs:
        require_local(spec)
        spec = os.path.expanduser(os.fspath(spec))
        if any(c in GLOB_CHARS for c in spec) and not os.path.exists(spec):
            matches = glob.glob(spec, recursive=True)
            if not matches:
                raise ClipjaxError(f"no files match {spec!r}")
            for m in matches:
                if os.path.isdir(m):
                    found.update(_walk(m, recursive))
                elif is_image_file(m):
                    found.add(os.path.abspath(m))
        elif os.path.isdir(spec):
            found.update(_walk(spec, recursive))
        elif os.path.isfile(spec):
            found.add(os.path.abspath(spec))
        else:
            raise ClipjaxError(f"{spec}: no such file or directory")
    return sorted(found)


def _walk(root: str, recursive: bool) -> Iterable[str]:
    return (os.path.abspath(os.path.join(root, rel))
            for rel in imageio.list_images(root, recursive=recursive))


def open_image(path: str) -> Image.Image:
    """Opens and decodes the whole image now (PIL is lazy), keeping its mode.

    The mode is left alone so that the model's preprocessing converts to RGB
    where open_clip does (after resize and crop).
    """
    require_local(path)
    return imageio.read(path, rgb=False)


def load_pixels(path: str, transform: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """`transform(image)` for the file at `path`; any failure is an `UnreadableImage`."""
    image = open_image(path)
    try:
        return transform(image)
    except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt data
        raise UnreadableImage("decode_error", imageio.said(e), path) from None


def iter_batches(paths: Sequence[str], transform: Callable[[Image.Image], np.ndarray],
                 batch_size: int, *, workers: int = 0, prefetch: int = 2,
                 ) -> Iterator[tuple[list[str], np.ndarray | None, list[UnreadableImage]]]:
    """Yields (readable paths, stacked `transform` outputs or None, unreadable) per batch.

    Files are decoded on a thread pool (PIL releases the GIL while decoding and
    resizing), `prefetch` batches ahead of the consumer, so decoding overlaps the
    model's work on the previous batch.
    """
    if batch_size < 1:
        raise ClipjaxError(f"batch_size must be >= 1, got {batch_size}")
    workers = workers or min(8, os.cpu_count() or 1)

    def load(path):
        try:
            return path, load_pixels(path, transform)
        except UnreadableImage as e:
            return path, e

    with ThreadPoolExecutor(workers) as pool:
        for results, _ in threaded.map_batches(load, paths, batch_size, pool, ahead=prefetch):
            yield _collect(results)


def _collect(results):
    ok, arrays, bad = [], [], []
    for path, result in results:
        if isinstance(result, UnreadableImage):
            bad.append(result)
        else:
            ok.append(path)
            arrays.append(result)
    return ok, (np.stack(arrays) if arrays else None), bad


def embed_files(model, paths: Sequence[str], *, batch_size: int = 64, progress: bool = False,
                desc: str = "embedding") -> tuple[list[str], np.ndarray, list[UnreadableImage]]:
    """(readable paths, their float32 [N, D] embeddings, the unreadable files) for `model`."""
    from tqdm.auto import tqdm

    ok_all, rows, bad_all = [], [], []
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress or not paths,
              dynamic_ncols=True) as bar:
        for ok, pixels, bad in iter_batches(paths, model.preprocess.pixels, batch_size):
            if ok:
                rows.append(model.encode_images(pixels, batch_size=batch_size))
                ok_all += ok
            bad_all += bad
            bar.update(len(ok) + len(bad))
    emb = np.concatenate(rows) if rows else np.zeros((0, model.embed_dim), np.float32)
    return ok_all, emb, bad_all
