"""Reading images: the one place clipjax opens an image with PIL, lists image files,
and decides what counts as one.

Training, evaluation and the apps all read images that may be hostile or damaged
(truncated JPEGs, zero-byte files, PNG headers declaring gigapixels): every
failure here is an `UnreadableImage` with a short `reason` that callers count
and skip. The declared size is checked before any pixel is decoded.
"""

from __future__ import annotations

import io
import os
import warnings

from PIL import Image, ImageOps

from clipjax import paths

# One list of what an image file is called, for every folder walk and every tar sample
# (in the order a sample holding two images is read).
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
IMAGE_EXTENSIONS = frozenset("." + e for e in IMAGE_SUFFIXES)
# PIL's own default (≈ 89.5 megapixels): larger headers are decompression bombs.
MAX_PIXELS = 89_478_485


class UnreadableImage(Exception):
    """An image that cannot be read: `reason` is a short counter key (missing_image,
    empty_image, decompression_bomb, decode_error), `detail` what PIL said."""

    def __init__(self, reason: str, detail: str = "", path: str | None = None):
        self.reason = reason
        self.detail = detail
        self.path = path
        text = f"{reason}: {detail}" if detail else reason
        super().__init__(f"{path}: {text}" if path else text)

    @property
    def why(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(root: str, *, recursive: bool = True) -> list[str]:
    """The image files under `root` (local or remote), as sorted '/'-separated paths
    relative to it; hidden files and folders are left out."""
    listed = paths.list_files(root)
    return image_paths(listed if recursive else [f for f in listed if "/" not in f])


def image_paths(relative: list[str]) -> list[str]:
    """The image files among '/'-separated relative paths, hidden ones left out."""
    return [rel for rel in relative
            if is_image_file(rel) and not any(p.startswith(".") for p in rel.split("/"))]


def open_bytes(data: bytes | None, *, max_pixels: int = MAX_PIXELS,
               path: str | None = None) -> Image.Image:
    """Opens encoded bytes lazily (nothing decoded yet), checking the declared size."""
    if data is None:
        raise UnreadableImage("missing_image", path=path)
    if len(data) == 0:
        raise UnreadableImage("empty_image", path=path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # PIL's own limit (2x its MAX_IMAGE_PIXELS)
        raise UnreadableImage("decompression_bomb", str(e), path) from None
    except Exception as e:  # noqa: BLE001 - malformed files raise OSError, struct.error, ...
        raise UnreadableImage("decode_error", said(e), path) from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise UnreadableImage("decode_error", f"size {w}x{h}", path)
    if max_pixels and w * h > max_pixels:
        raise UnreadableImage("decompression_bomb", f"{w}x{h} pixels", path)
    return img


def load(img: Image.Image, *, rgb: bool = True, exif_transpose: bool = False,
         draft_size: tuple[int, int] | None = None, path: str | None = None) -> Image.Image:
    """Decodes the pixels of an opened image (optionally at a reduced JPEG scale),
    upright by its EXIF orientation if asked, and in RGB if asked."""
    try:
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", draft_size)
        img.load()
        if exif_transpose:
            img = ImageOps.exif_transpose(img)
        return to_rgb(img) if rgb else img
    except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt data
        raise UnreadableImage("decode_error", said(e), path) from None


def decode(data: bytes | None, *, max_pixels: int = MAX_PIXELS, rgb: bool = True,
           exif_transpose: bool = False, path: str | None = None) -> Image.Image:
    """Encoded bytes → a decoded image."""
    return load(open_bytes(data, max_pixels=max_pixels, path=path), rgb=rgb,
                exif_transpose=exif_transpose, path=path)


def read(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS, rgb: bool = True,
         exif_transpose: bool = False) -> Image.Image:
    """The decoded image in a file, local or remote (through clipjax.paths)."""
    name = os.fspath(path)
    try:
        data = paths.read_bytes_or_none(name)
    except OSError as e:
        raise UnreadableImage("missing_image", said(e), name) from None
    if data is None:
        raise UnreadableImage("missing_image", "no such file", name)
    return decode(data, max_pixels=max_pixels, rgb=rgb, exif_transpose=exif_transpose,
                  path=name)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB, as open_clip does: `convert("RGB")` (grayscale replicated,
    palettes looked up, CMYK converted, an alpha channel dropped, not composited)."""
    return img if img.mode == "RGB" else img.convert("RGB")


def said(e: Exception) -> str:
    """An exception as `Type: message`, for a skip line."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
