"""The samples of one shard as curation sees them, under the training pipeline's rules.

An image that does not decode, a missing, empty or non-UTF-8 caption, a truncated
member: the sample is skipped and its reason counted (the same `decode.BadSample`
reasons `clipjax train` counts), never fatal. The caption is the first non-empty
line, as training reads it with `caption_choice=first`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from clipjax.data import decode
from clipjax.data import webdataset as wds

DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own decompression-bomb limit (2x its default)


@dataclass
class Decoded:
    key: str
    image: Image.Image
    caption: str


def sample_key(record_key: str) -> str:
    """`url:KEY` (what the webdataset reader names records) -> KEY."""
    return record_key.rsplit(":", 1)[-1]


def decode_record(record: dict, max_pixels: int = DEFAULT_MAX_PIXELS,
                  draft: tuple[int, int] | None = None) -> Decoded:
    """A raw record -> image + caption, or `decode.BadSample` naming the reason."""
    if record.get("error"):
        raise decode.BadSample(record["error"])
    caption = decode.caption_candidates(record["text"], split_lines=True)[0]
    img = decode.load_rgb(decode.open_image(record["image"], max_pixels), draft)
    return Decoded(sample_key(record["key"]), img, caption)


def caption_of(record: dict) -> str:
    """The caption alone (filter rules need no pixels); BadSample when unusable."""
    if record.get("error"):
        raise decode.BadSample(record["error"])
    return decode.caption_candidates(record["text"], split_lines=True)[0]


def iter_records(url: str) -> Iterator[dict]:
    """Every raw record of a shard in file order (an unreadable shard: one error record)."""
    return wds.iter_shard(url)


def count(skipped: dict[str, int], reason: str) -> None:
    skipped[reason] = skipped.get(reason, 0) + 1
