"""The body of `POST /api/search`, checked before any work is done.

Exactly one of `text`, `image` (base64, a data: URL prefix allowed), `embedding`
(a list of `dim` numbers) or `like` (a result's `id`: "more like this"), plus
`k` and an optional `threshold` (the lowest cosine score to return). Anything
else is a `BadRequest` whose message says what is wrong: a 4xx, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass

import numpy as np

KINDS = ("text", "image", "embedding", "like")
MAX_K = 1000
MAX_TEXT_CHARS = 2000


class BadRequest(Exception):
    """A client error: `status` (400, 404, 413, 422) and a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Query:
    kind: str  # one of KINDS
    value: object  # str text | bytes image | float32 [D] | int row
    k: int = 10
    threshold: float | None = None


def parse(body: bytes, *, dim: int, size: int) -> Query:
    """`body` (JSON bytes) as a Query against an index of `size` rows of `dim` dimensions."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest(f"the request body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object, e.g. "
                         '{"text": "a dog on a beach", "k": 10}')
    unknown = sorted(set(data) - {*KINDS, "k", "threshold"})
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; a query has one of "
                         f"{', '.join(KINDS)}, plus k and threshold")
    given = [kind for kind in KINDS if data.get(kind) is not None]
    if len(given) != 1:
        raise BadRequest(f"give exactly one of {', '.join(KINDS)}; got "
                         f"{', '.join(given) if given else 'none'}")
    kind = given[0]
    value = {"text": _text, "image": _image, "embedding": _embedding, "like": _row}[kind](
        data[kind], dim=dim, size=size)
    return Query(kind, value, _k(data.get("k", 10)), _threshold(data.get("threshold")))


def _k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise BadRequest(f"k must be an integer from 1 to {MAX_K}; got {json.dumps(k)}")
    return k


def _threshold(t) -> float | None:
    if t is None:
        return None
    if isinstance(t, bool) or not isinstance(t, int | float) or not -1.0 <= t <= 1.0:
        raise BadRequest(f"threshold must be a number from -1 to 1 (a cosine score); got "
                         f"{json.dumps(t)}")
    return float(t)


def _text(text, **_) -> str:
    if not isinstance(text, str):
        raise BadRequest(f"text must be a string; got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise BadRequest("text is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise BadRequest(f"text is {len(text)} characters; at most {MAX_TEXT_CHARS}")
    return text


def _image(image, **_) -> bytes:
    if not isinstance(image, str):
        raise BadRequest("image must be a base64 string (the file's bytes)")
    if image.startswith("data:"):
        image = image.partition(",")[2]
    try:
        raw = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"image is not valid base64: {e}") from None
    if not raw:
        raise BadRequest("image is empty")
    return raw


def _embedding(vector, *, dim: int, **_) -> np.ndarray:
    if not isinstance(vector, list) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in vector):
        raise BadRequest("embedding must be a list of numbers")
    if len(vector) != dim:
        raise BadRequest(f"embedding has {len(vector)} numbers; this index has {dim} "
                         "dimensions", status=422)
    try:
        v = np.asarray(vector, np.float64)
    except OverflowError:
        v = np.array([np.inf])
    if not np.all(np.isfinite(v)):
        raise BadRequest("embedding holds a non-finite number", status=422)
    norm = float(np.linalg.norm(v))
    if norm == 0.0 or not math.isfinite(norm):
        raise BadRequest("embedding is all zeros", status=422)
    return (v / norm).astype(np.float32)


def _row(row, *, size: int, **_) -> int:
    if isinstance(row, bool) or not isinstance(row, int):
        raise BadRequest(f"like must be a result's integer id; got {json.dumps(row)}")
    if not 0 <= row < size:
        raise BadRequest(f"like: no image {row} in this index ({size} images)", status=404)
    return row
