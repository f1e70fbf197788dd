"""Local image folders: class sub-folders, or images with same-named .txt captions.

`scan_folder` is reusable (the evaluator reads class folders with it):

    root/cat/001.jpg, root/dog/002.png        -> classes ('cat', 'dog'), labels per file
    root/a.jpg + root/a.txt, root/sub/b.png   -> captioned images (recursive)

`root` may be local, relative or on a bucket (gs://); `files` are '/'-separated paths
relative to it.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from clipjax import imageio, paths
from clipjax.errors import ClipjaxError


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


def scan_folder(root: str, kind: str = "auto") -> FolderListing:
    """Lists a folder as classes or captioned images (kind 'auto' decides from .txt files).

    `root` may be local, relative or remote (gs://): one recursive listing either way.
    """
    root = paths.canonical(root)
    listed = _list(root)
    if listed is None:
        raise ClipjaxError(f"image folder not found: {root}")
    images = imageio.image_paths(listed)
    if not images:
        raise ClipjaxError(f"{root}: no images (looked for "
                           f"{', '.join(sorted(imageio.IMAGE_EXTENSIONS))})")
    present = set(listed)
    txts = [posixpath.splitext(p)[0] + ".txt" for p in images]
    has_txt = [t in present for t in txts]
    if kind == "auto":
        kind = "captions" if any(has_txt) else "classes"
    if kind == "captions":
        return FolderListing(root, "captions", images, [], [],
                             [f"{root}/{t}" if ok else None for t, ok in zip(txts, has_txt)])
    if kind != "classes":
        raise ClipjaxError(f"folder kind must be auto, classes or captions; got {kind!r}")
    in_class = [p for p in images if "/" in p]
    if not in_class:
        raise ClipjaxError(
            f"{root}: images have neither .txt captions nor class sub-folders")
    classnames = sorted({p.split("/", 1)[0] for p in in_class})
    index = {c: i for i, c in enumerate(classnames)}
    labels = [index[p.split("/", 1)[0]] for p in in_class]
    return FolderListing(root, "classes", in_class, labels, classnames, [])


def _list(root: str) -> list[str] | None:
    """Every file under `root`, or None when it is not a directory (a prefix without
    objects, remotely)."""
    if not paths.is_remote(root) and not paths.is_dir(root):
        return None
    try:
        files = paths.list_files(root)
    except FileNotFoundError:
        return None
    return files if files or not paths.is_remote(root) else None


def read_bytes(path: str) -> bytes | None:
    try:
        return paths.read_bytes_or_none(path)
    except OSError:
        return None
