"""Zero-shot classification: prompt-ensembled class embeddings and accuracy metrics.

CLIP's recipe: every (class, template) prompt is embedded and L2-normalised,
the embeddings of one class are averaged and the mean renormalised; an image's
logits are 100 · image_emb @ classifierᵀ. Metrics are fractions in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from clipjax.evaluate import prompts as prompts_lib

LOGIT_SCALE = 100.0


def _normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def ensemble(text_emb: np.ndarray) -> np.ndarray:
    """[C, T, D] prompt embeddings → [C, D] class embeddings (normalise, mean, renormalise)."""
    text_emb = np.asarray(text_emb, np.float32)
    if text_emb.ndim != 3:
        raise ValueError(f"expected [classes, templates, dim], got shape {text_emb.shape}")
    return _normalize(_normalize(text_emb).mean(axis=1)).astype(np.float32)


def build_classifier(encode_texts: Callable[[list[str]], np.ndarray], classnames: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
    """Embeds every prompt with `encode_texts` and ensembles them: [C, D] float32."""
    texts = prompts_lib.prompts(list(classnames), list(templates))
    emb = np.asarray(encode_texts(texts), np.float32)
    return ensemble(emb.reshape(len(classnames), len(templates), -1))


def logits(image_emb: np.ndarray, classifier: np.ndarray,
           scale: float = LOGIT_SCALE) -> np.ndarray:
    return scale * (np.asarray(image_emb, np.float32) @ np.asarray(classifier, np.float32).T)


def topk_correct(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """bool [N]: the label is among the k highest scores (k capped at the class count)."""
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return (top == labels[:, None]).any(axis=1)


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [C, C]: row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (labels, pred), 1)
    return cm


def mean_per_class_recall(cm: np.ndarray) -> float:
    """Mean over the classes present in the labels of (correct / examples of that class)."""
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return 0.0
    return float((np.diag(cm)[present] / support[present]).mean())


class Accumulator:
    """Streams batches of scores and labels into top-k counts and a confusion matrix."""

    def __init__(self, num_classes: int, ks: Sequence[int] = (1, 5)):
        self.num_classes = num_classes
        self.ks = tuple(ks)
        self.correct = dict.fromkeys(self.ks, 0)
        self.count = 0
        self.cm = np.zeros((num_classes, num_classes), np.int64)

    def update(self, scores: np.ndarray, labels: np.ndarray) -> None:
        scores = np.asarray(scores)
        labels = np.asarray(labels, np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}); got {labels.min()}..{labels.max()}")
        for k in self.ks:
            self.correct[k] += int(topk_correct(scores, labels, k).sum())
        self.cm += confusion_matrix(scores.argmax(axis=1), labels, self.num_classes)
        self.count += len(labels)

    def metrics(self) -> dict[str, float]:
        n = max(self.count, 1)
        out = {f"top{k}": self.correct[k] / n for k in self.ks}
        out["mean_per_class_recall"] = mean_per_class_recall(self.cm)
        return out


def classification_metrics(scores: np.ndarray, labels: np.ndarray,
                           num_classes: int | None = None) -> dict[str, float]:
    """top1, top5 and mean per-class recall of a full [N, C] score matrix."""
    scores = np.asarray(scores)
    acc = Accumulator(num_classes or scores.shape[1])
    acc.update(scores, labels)
    return acc.metrics()
