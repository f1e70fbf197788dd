"""Image↔text retrieval Recall@K with several captions per image.

image→text: a query image scores a hit at K if ANY of its captions is among
the K best texts (the CLIP convention). text→image: each caption has exactly
one positive image. Ties are broken by index, as a stable descending sort
would: of two equal scores the lower index ranks first. Scores are computed in
row blocks so the full N×M matrix never has to fit in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KS = (1, 5, 10)


def _best_positive_rank(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Rank (0 = first) of the best-ranked positive in each row of `scores` [Q, M]."""
    masked = np.where(positive, scores, -np.inf)
    best = masked.argmax(axis=1)  # first maximum: the lowest index among tied positives
    rows = np.arange(scores.shape[0])
    s = scores[rows, best][:, None]
    idx = np.arange(scores.shape[1])[None, :]
    ahead = (scores > s) | ((scores == s) & (idx < best[:, None]))
    return ahead.sum(axis=1)


def _ranks(queries: np.ndarray, keys: np.ndarray, positive_of, block: int) -> np.ndarray:
    ranks = []
    for start in range(0, len(queries), block):
        q = queries[start:start + block]
        scores = q @ keys.T
        ranks.append(_best_positive_rank(scores, positive_of(start, len(q))))
    return np.concatenate(ranks) if ranks else np.zeros((0,), np.int64)


def recall_at_k(image_emb: np.ndarray, text_emb: np.ndarray, text_image: Sequence[int],
                ks: Sequence[int] = KS, block: int = 1024) -> dict[str, float]:
    """Recall@K both ways. `text_image[j]` = index of the image caption j describes.

    Returns {"image_to_text_R@K": .., "text_to_image_R@K": ..} as fractions.
    """
    image_emb = np.asarray(image_emb, np.float32)
    text_emb = np.asarray(text_emb, np.float32)
    text_image = np.asarray(text_image, np.int64)
    n, m = len(image_emb), len(text_emb)
    if text_image.shape != (m,):
        raise ValueError(f"text_image needs one image index per text ({m}); got {text_image.shape}")
    if m and (text_image.min() < 0 or text_image.max() >= n):
        raise ValueError(f"text_image indices must lie in [0, {n})")
    if n and np.bincount(text_image, minlength=n).min() == 0:
        raise ValueError("every image needs at least one caption")

    def i2t_positive(start, count):
        return text_image[None, :] == np.arange(start, start + count)[:, None]

    def t2i_positive(start, count):
        return text_image[start:start + count, None] == np.arange(n)[None, :]

    i2t = _ranks(image_emb, text_emb, i2t_positive, block)
    t2i = _ranks(text_emb, image_emb, t2i_positive, block)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = float((i2t < k).mean()) if n else 0.0
    for k in ks:
        out[f"text_to_image_R@{k}"] = float((t2i < k).mean()) if m else 0.0
    return out
