"""Local image folders: class sub-folders, or images with same-named .txt captions.

`scan_folder` is reusable (the evaluator reads class folders with it):

    root/cat/001.jpg, root/dog/002.png        -> classes ('cat', 'dog'), labels per file
    root/a.jpg + root/a.txt, root/sub/b.png   -> captioned images (recursive)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from clipjax.errors import ClipjaxError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class FolderListing:
    """What a folder holds: image paths (relative to root) and labels or caption paths."""

    root: str
    kind: str  # "classes" | "captions"
    files: list[str]
    labels: list[int]  # classes: label per file; captions: empty
    classnames: list[str]  # classes: sorted sub-folder names
    captions: list[str | None]  # captions: .txt path per image (None if absent)

    def __len__(self) -> int:
        return len(self.files)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")


def _walk_images(root: str) -> list[str]:
    out = []
    for d, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out.extend(os.path.relpath(os.path.join(d, f), root) for f in sorted(files)
                   if _is_image(f))
    return out


def scan_folder(root: str, kind: str = "auto") -> FolderListing:
    """Lists a folder as classes or captioned images (kind 'auto' decides from .txt files)."""
    if not os.path.isdir(root):
        raise ClipjaxError(f"image folder not found: {root}")
    images = _walk_images(root)
    if not images:
        raise ClipjaxError(f"{root}: no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    txts = [os.path.splitext(os.path.join(root, p))[0] + ".txt" for p in images]
    has_txt = [os.path.isfile(t) for t in txts]
    if kind == "auto":
        kind = "captions" if any(has_txt) else "classes"
    if kind == "captions":
        return FolderListing(root, "captions", images, [], [],
                             [t if ok else None for t, ok in zip(txts, has_txt)])
    if kind != "classes":
        raise ClipjaxError(f"folder kind must be auto, classes or captions; got {kind!r}")
    in_class = [p for p in images if os.sep in p]
    if not in_class:
        raise ClipjaxError(
            f"{root}: images have neither .txt captions nor class sub-folders")
    classnames = sorted({p.split(os.sep, 1)[0] for p in in_class})
    index = {c: i for i, c in enumerate(classnames)}
    labels = [index[p.split(os.sep, 1)[0]] for p in in_class]
    return FolderListing(root, "classes", in_class, labels, classnames, [])


def read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None
