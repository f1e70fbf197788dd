"""MNIST-style IDX files (MNIST, Fashion-MNIST), gzipped or not.

Reusable by the converter and the evaluator: `read_idx(path)` returns the
array; `load_split(directory, split)` returns images and labels.
"""

from __future__ import annotations

import gzip

import numpy as np

from clipjax import paths
from clipjax.errors import ClipjaxError

# Debian's `dataset-fashion-mnist` package installs the files here.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
MNIST_CLASSES = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")

_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_PREFIX = {"train": "train", "test": "t10k"}


def parse_idx(raw: bytes, name: str = "IDX data") -> np.ndarray:
    """Decodes the bytes of one IDX file: magic (0, 0, dtype, ndim), big-endian dims, data."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ClipjaxError(f"{name}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ClipjaxError(f"{name}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 1
    if len(raw) - header != count * dtype.itemsize:  # truncated, or more than it says
        raise ClipjaxError(f"{name}: header says {dims} but the file holds "
                           f"{len(raw) - header} bytes of data (expected "
                           f"{count * dtype.itemsize})")
    data = np.frombuffer(raw, dtype, count=count, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def read_idx(path: str) -> np.ndarray:
    """Reads `path` (or `path.gz`; local or remote) into a native-endian numpy array."""
    path = paths.canonical(path)
    if not paths.exists(path) and paths.exists(path + ".gz"):
        path += ".gz"
    try:
        raw = paths.read_bytes(path)
    except OSError as e:
        raise ClipjaxError(f"cannot read IDX file {path}: {e.strerror or e}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ClipjaxError(f"{path}: broken gzip stream: {e}") from None
    return parse_idx(raw, path)


def split_files(directory: str, split: str) -> tuple[str, str]:
    """The (images, labels) paths of `split` ('train' or 'test') under `directory`."""
    if split not in _PREFIX:
        raise ClipjaxError(f"IDX split must be 'train' or 'test'; got {split!r}")
    prefix = _PREFIX[split]
    directory = paths.canonical(directory)
    present = set(paths.dir_identities(directory))  # one listing, also on a bucket
    found = []
    for kind, nd in (("images", 3), ("labels", 1)):
        name = f"{prefix}-{kind}-idx{nd}-ubyte"
        for cand in (name, name + ".gz", f"{prefix}-{kind}.idx{nd}-ubyte"):
            if cand in present:
                found.append(f"{directory.rstrip('/')}/{cand}")
                break
        else:
            raise ClipjaxError(f"{directory}: no {name}[.gz] for split {split!r}")
    return found[0], found[1]


def load_split(directory: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, H, W] and int64 labels [N] of an MNIST-style directory."""
    img_path, lbl_path = split_files(directory, split)
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ClipjaxError(
            f"{directory}: images {images.shape} and labels {labels.shape} do not match")
    return images.astype(np.uint8, copy=False), labels.astype(np.int64)


def default_classes(directory: str) -> tuple[str, ...]:
    """Fashion-MNIST names when the directory says so, digits otherwise."""
    fashion = "fashion" in paths.canonical(directory).lower()
    return FASHION_MNIST_CLASSES if fashion else MNIST_CLASSES


def write_idx(path: str, array: np.ndarray) -> None:
    """Writes an IDX file (gzipped when `path` ends in .gz); for tests and small tools."""
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _DTYPES.items()}
    arr = np.asarray(array)
    code = codes[arr.dtype.newbyteorder("=")]
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    raw = header + arr.astype(np.dtype(_DTYPES[code])).tobytes()
    paths.write_bytes(path, gzip.compress(raw) if path.endswith(".gz") else raw)
