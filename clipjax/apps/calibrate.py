"""Choosing the open-set threshold on a small labelled folder, for a target precision.

The folder holds one sub-folder per label (named like the label; case, `_` and
`-` are forgiven) with images of that label, and any other sub-folders
(`none/`, `other/`, ...) with images that belong to no label: the negatives.

An image is *flagged* when its best cosine similarity reaches the threshold,
and a flag is *correct* when the best label is its true label. Sweeping the
threshold down the sorted scores, precision = correct flags / flags and
recall = correct flags / images of the labels; the chosen threshold is the
lowest (most recall) whose precision still meets the target, placed halfway
to the next lower score.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from clipjax.apps.image_files import find_images, require_local
from clipjax.errors import ClipjaxError


@dataclass
class Calibration:
    threshold: float
    precision: float
    recall: float
    target_precision: float
    flagged: int
    correct: int
    positives: int  # images whose folder is a label
    negatives: int  # images of no label
    accuracy_at_zero: float  # top-1 accuracy on the positives without a threshold

    def to_json(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _key(name: str) -> str:
    return name.lower().replace("_", " ").replace("-", " ").strip()


def labelled_images(folder: str, labels: list[str]) -> tuple[list[str], list[str | None],
                                                              list[str]]:
    """(paths, true label or None for negatives, names of the negative sub-folders)."""
    require_local(folder, "labelled image folders")
    if not os.path.isdir(folder):
        raise ClipjaxError(f"{folder}: not a directory")
    by_key = {_key(lab): lab for lab in labels}
    paths, truth, negative_dirs = [], [], []
    for name in sorted(os.listdir(folder)):
        sub = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isdir(sub):
            continue
        label = by_key.get(_key(name))
        if label is None:
            negative_dirs.append(name)
        found = find_images(sub)
        paths += found
        truth += [label] * len(found)
    if not any(t is not None for t in truth):
        raise ClipjaxError(
            f"{folder}: no sub-folder named like a label ({', '.join(labels[:5])}"
            f"{', ...' if len(labels) > 5 else ''}) holds images")
    return paths, truth, negative_dirs


def choose_threshold(scores, predicted, truth, target_precision: float) -> Calibration:
    """The lowest threshold on `scores` (best cosine per image) whose precision meets
    the target. `predicted` and `truth` are label names (truth None = negative)."""
    if not 0 < target_precision <= 1:
        raise ClipjaxError(f"precision must lie in (0, 1], got {target_precision}")
    scores = np.asarray(scores, np.float64)
    correct = np.array([p == t and t is not None for p, t in zip(predicted, truth)])
    positives = sum(t is not None for t in truth)
    order = np.argsort(-scores, kind="stable")
    s, c = scores[order], correct[order]
    hits = np.cumsum(c)
    flagged = np.arange(1, len(s) + 1)
    precision = hits / flagged
    # Only cut after the last of a run of equal scores: a threshold cannot split ties.
    cut_ok = np.append(s[1:] < s[:-1], True)
    ok = np.flatnonzero(cut_ok & (precision >= target_precision - 1e-12))
    if not len(ok):
        valid = np.flatnonzero(cut_ok)
        best = valid[np.argmax(precision[valid])]
        raise ClipjaxError(
            f"no threshold reaches precision {target_precision:g} on these {len(s)} images; "
            f"the best is {precision[best]:.3f} (at threshold {s[best]:.4f}, "
            f"{int(hits[best])} correct of {int(flagged[best])} flagged)")
    j = int(ok[-1])
    threshold = float(s[j] if j + 1 == len(s) else (s[j] + s[j + 1]) / 2)
    return Calibration(
        threshold=threshold, precision=float(precision[j]),
        recall=float(hits[j] / max(positives, 1)), target_precision=float(target_precision),
        flagged=int(flagged[j]), correct=int(hits[j]), positives=int(positives),
        negatives=int(len(s) - positives),
        accuracy_at_zero=float(correct.sum() / max(positives, 1)))


def calibrate(classifier, image_emb, truth, target_precision: float) -> Calibration:
    """Threshold for `classifier` (a `clipjax.apps.classify.Classifier`) on embedded,
    labelled images."""
    cos = classifier.cosines(image_emb)
    best = cos.argmax(axis=1)
    predicted = [classifier.labels[i] for i in best]
    return choose_threshold(cos.max(axis=1), predicted, truth, target_precision)
