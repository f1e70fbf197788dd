"""Which pairs to keep: a score threshold and caption rules, each drop counted by its rule.

`--min-score S` keeps pairs whose cosine is at least S (DataComp's B/32 baseline
is 0.25, LAION-2B's 0.28); `--keep-fraction F` keeps the best F of every scored
pair (the threshold is the (1-F) quantile of their cosines, DataComp's "top 30%"
is F=0.3). The first rule a pair fails is the one it is counted under, in the
order of `RULES`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from clipjax.errors import ClipjaxError

# The order in which a dropped pair is attributed to a rule.
RULES = ("bad_sample", "not_scored", "excluded", "caption_words", "not_english", "score")


@dataclass(frozen=True)
class Rules:
    min_score: float | None = None
    keep_fraction: float | None = None
    min_caption_words: int = 0
    english: bool = False
    exclude: frozenset = field(default_factory=frozenset)  # {(shard url, key)}

    def __post_init__(self):
        if (self.min_score is None) == (self.keep_fraction is None):
            raise ClipjaxError("give exactly one of --min-score and --keep-fraction")
        if self.keep_fraction is not None and not 0.0 < self.keep_fraction <= 1.0:
            raise ClipjaxError(f"--keep-fraction must be in (0, 1]; got {self.keep_fraction}")
        if self.min_score is not None and not -1.0 <= self.min_score <= 1.0:
            raise ClipjaxError(f"--min-score is a cosine in [-1, 1]; got {self.min_score}")
        if self.min_caption_words < 0:
            raise ClipjaxError(f"--min-caption-words must be >= 0; got "
                               f"{self.min_caption_words}")


def threshold(rules: Rules, cosines: np.ndarray) -> float:
    """The cosine a pair needs; with keep_fraction, the quantile that keeps that share."""
    if rules.min_score is not None:
        return float(rules.min_score)
    if len(cosines) == 0:
        return float("inf")
    ordered = np.sort(np.asarray(cosines, np.float64))[::-1]
    kept = max(1, int(round(rules.keep_fraction * len(ordered))))
    return float(ordered[kept - 1])


def caption_words(caption: str) -> int:
    return len(caption.split())


@functools.cache
def _classify():
    try:
        import py3langid
    except ImportError as e:
        raise ClipjaxError(f"--english needs py3langid ({e}); pip install py3langid") from None
    return py3langid.classify


def language(caption: str) -> str:
    """ISO 639-1 code of the caption's language (py3langid: 97 languages, model ships in
    the wheel; short captions are guesses)."""
    return _classify()(caption)[0]


def verdict(rules: Rules, cut: float, shard: str, key: str, caption: str,
            cosine: float | None) -> str | None:
    """None to keep the pair, else the first rule it fails (`bad_sample` is the reader's)."""
    if cosine is None:
        return "not_scored"
    if (shard, key) in rules.exclude:
        return "excluded"
    if rules.min_caption_words and caption_words(caption) < rules.min_caption_words:
        return "caption_words"
    if rules.english and language(caption) != "en":
        return "not_english"
    if cosine < cut:
        return "score"
    return None
