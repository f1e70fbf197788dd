"""CLIPScore (Hessel et al. 2021): how well an image matches its text, reference-free.

    CLIP-S(image, text) = w · max(cos(E_image, E_text), 0),  w = 2.5

per pair, and the mean over pairs. The paper prefixes captions with "A photo
depicts" for its caption benchmarks; `prefix` does the same when wanted.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clipjax import paths
from clipjax.errors import ClipjaxError

W = 2.5
PAPER_PREFIX = "A photo depicts "


@dataclass
class Scores:
    per_pair: np.ndarray  # float32 [N]
    cosine: np.ndarray  # float32 [N]

    @property
    def mean(self) -> float:
        return float(self.per_pair.mean()) if len(self.per_pair) else float("nan")


def clip_score(image_emb, text_emb, w: float = W) -> np.ndarray:
    """w · max(cos, 0) for each row pair of two [N, D] embedding matrices."""
    a = np.asarray(image_emb, np.float32)
    b = np.asarray(text_emb, np.float32)
    if a.shape != b.shape or a.ndim != 2:
        raise ClipjaxError(f"image and text embeddings must both be [N, D]; got "
                           f"{a.shape} and {b.shape}")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (w * np.maximum((a * b).sum(axis=1), 0.0)).astype(np.float32)


def score(model, images, texts: Sequence[str], *, w: float = W, prefix: str = "") -> Scores:
    """CLIPScore of image i against text i (images: anything `encode_images` takes)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    image_emb = model.encode_images(images)
    if len(image_emb) != len(texts):
        raise ClipjaxError(f"{len(image_emb)} images but {len(texts)} texts; "
                           "score pairs image i with text i")
    text_emb = model.encode_texts([prefix + t for t in texts])
    cos = (image_emb * text_emb).sum(axis=1).astype(np.float32)
    return Scores(per_pair=clip_score(image_emb, text_emb, w), cosine=cos)


def read_pairs(path: str) -> list[tuple[str, str]]:
    """(image path, text) rows of a TSV file; image paths are relative to the file.

    A first row reading `image<TAB>text` (or prompt/caption) is a header. The file may
    be remote (`gs://...`); the images it names must be local (absolute paths, or
    relative to a local file).
    """
    try:
        text = paths.read_text(path)
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t",
                               quoting=csv.QUOTE_NONE))
    except OSError as e:
        raise ClipjaxError(f"cannot read pairs file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ClipjaxError(f"{path}: not UTF-8 text: {e}") from None
    base = paths.resolve(path).parent
    pairs = []
    for i, row in enumerate(rows, 1):
        if not row or not "".join(row).strip():
            continue
        if i == 1 and [c.strip().lower() for c in row[:2]] in (
                ["image", "text"], ["image", "prompt"], ["image", "caption"],
                ["path", "text"], ["path", "prompt"]):
            continue
        if len(row) < 2 or not row[1].strip():
            raise ClipjaxError(f"{path}:{i}: expected `image<TAB>text`, got {row!r}")
        image = os.path.expanduser(row[0].strip())
        if not (os.path.isabs(image) or paths.is_remote(image)):
            image = os.fspath(base / image)
        pairs.append((image, "\t".join(row[1:]).strip()))
    if not pairs:
        raise ClipjaxError(f"{path}: no image/text pairs")
    return pairs
