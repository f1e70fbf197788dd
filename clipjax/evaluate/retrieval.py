"""Image↔text retrieval Recall@K with several captions per image.

image→text: a query image scores a hit at K if ANY of its captions is among
the K best texts (the CLIP convention). text→image: each caption has exactly
one positive image. Ties are broken by index, as a stable descending sort
would: of two equal scores the lower index ranks first (CLIP_benchmark's torch.topk
may order ties otherwise; with identical captions, hence identical text embeddings,
image→text R@K can then differ by such ties). Scores are computed in row blocks so the
full N×M matrix never has to fit in memory.

`positives="caption"` (`clipjax eval --positives caption`) adds the same metrics with a
`_caption` suffix where a hit is any text whose caption is identical to one of the
image's (image→text), or any image that has a caption identical to the query
(text→image): the evaluation twin of training's `loss.positives=caption`, for sets where
one caption describes several images.
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


def caption_groups(texts: Sequence[str]) -> np.ndarray:
    """One id per text, equal for identical captions (surrounding whitespace ignored)."""
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(t.strip(), len(ids)) for t in texts], np.int64)


def recall_at_k(image_emb: np.ndarray, text_emb: np.ndarray, text_image: Sequence[int],
                ks: Sequence[int] = KS, block: int = 1024,
                groups: Sequence[int] | None = None) -> dict[str, float]:
    """Recall@K both ways. `text_image[j]` = index of the image caption j describes.

    Returns {"image_to_text_R@K": .., "text_to_image_R@K": ..} as fractions; with
    `groups` (`caption_groups(texts)`), also the `_caption` metrics of the module doc.
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

    out = _recalls(_ranks(image_emb, text_emb, i2t_positive, block),
                   _ranks(text_emb, image_emb, t2i_positive, block), ks, "")
    if groups is None:
        return out
    groups = np.asarray(groups, np.int64)
    if groups.shape != (m,):
        raise ValueError(f"groups needs one id per text ({m}); got {groups.shape}")
    # has[i, g]: image i has a caption of group g (dense per block of rows only).
    of_image = [set() for _ in range(n)]
    images_of: dict[int, set[int]] = {}
    for i, g in zip(text_image.tolist(), groups.tolist(), strict=True):
        of_image[i].add(g)
        images_of.setdefault(g, set()).add(i)

    def i2t_same_caption(start, count):
        wanted = np.zeros((count, int(groups.max()) + 1 if m else 1), bool)
        for q in range(count):
            wanted[q, list(of_image[start + q])] = True
        return wanted[:, groups]

    def t2i_same_caption(start, count):
        pos = np.zeros((count, n), bool)
        for q, g in enumerate(groups[start:start + count].tolist()):
            pos[q, list(images_of[g])] = True
        return pos

    out.update(_recalls(_ranks(image_emb, text_emb, i2t_same_caption, block),
                        _ranks(text_emb, image_emb, t2i_same_caption, block), ks, "_caption"))
    return out


def _recalls(i2t: np.ndarray, t2i: np.ndarray, ks: Sequence[int], suffix: str) -> dict:
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}{suffix}"] = float((i2t < k).mean()) if len(i2t) else 0.0
    for k in ks:
        out[f"text_to_image_R@{k}{suffix}"] = float((t2i < k).mean()) if len(t2i) else 0.0
    return out
