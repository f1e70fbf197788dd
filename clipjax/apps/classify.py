"""Zero-shot classification with your own labels, and open-set use with a threshold.

Each label becomes one class embedding: every template is filled with the
label, embedded, and the normalised embeddings are averaged and renormalised
(CLIP's prompt ensembling, `clipjax.evaluate.zeroshot.build_classifier`).
An image's label probabilities are softmax(exp(logit_scale) · cos) over the
labels, with exp(logit_scale) the model's learned temperature (≈100 for CLIP).
Models trained with the sigmoid loss (a `logit_bias`) give independent
per-label probabilities sigmoid(exp(logit_scale) · cos + logit_bias) instead.

Open-set use (content moderation): with a `threshold`, an image whose best
cosine similarity falls below it gets `none_label`; `clipjax calibrate`
chooses the threshold on a labelled folder (see `clipjax.apps.calibrate`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from clipjax.errors import ClipjaxError
from clipjax.evaluate import prompts as prompts_lib
from clipjax.evaluate import zeroshot

# `--templates default`: the 7 templates OpenAI's prompt-engineering notebook
# selected from its 80 ImageNet ones; they generalise beyond ImageNet.
DEFAULT_TEMPLATES = "imagenet1k_simple"
NO_TEMPLATE = ("{}",)


@dataclass
class Classifier:
    """Ensembled, L2-normalised class embeddings [C, D] and how to turn cosines into
    probabilities."""

    labels: list[str]
    templates: list[str]
    weights: np.ndarray
    scale: float  # exp(logit_scale)
    bias: float | None = None  # sigmoid models only

    def cosines(self, image_emb) -> np.ndarray:
        """[N, C] cosine similarities (image embeddings are unit vectors)."""
        x = np.asarray(image_emb, np.float32)
        if x.ndim != 2 or x.shape[1] != self.weights.shape[1]:
            raise ClipjaxError(f"image embeddings must be [N, {self.weights.shape[1]}]; got "
                               f"{tuple(x.shape)}")
        return x @ self.weights.T

    def probabilities(self, cos: np.ndarray) -> np.ndarray:
        logits = self.scale * np.asarray(cos, np.float64)
        if self.bias is not None:
            return (1.0 / (1.0 + np.exp(-(logits + self.bias)))).astype(np.float32)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


@dataclass
class Prediction:
    """The verdict for one image: `label` is the best label, or the none-label when
    a threshold is set and the best cosine similarity falls below it."""

    label: str
    probability: float  # of the best label (also when the none-label wins)
    score: float  # cosine similarity to the best label
    top: list[tuple[str, float, float]] = field(default_factory=list)  # (label, p, cos)
    flagged: bool = True  # the best label passed the threshold (True without one)

    def to_json(self) -> dict:
        return {"label": self.label, "probability": round(self.probability, 6),
                "score": round(self.score, 6), "flagged": self.flagged,
                "top": [{"label": lab, "probability": round(p, 6), "score": round(c, 6)}
                        for lab, p, c in self.top]}


def parse_labels(text: str | None = None, file: str | None = None) -> list[str]:
    """Labels from a comma-separated string or a file (one per line, or a JSON list)."""
    if (text is None) == (file is None):
        raise ClipjaxError("give the labels either as a comma-separated list or as a file")
    labels = ([x.strip() for x in text.split(",")] if text is not None
              else prompts_lib.read_list(file, "classnames"))
    labels = [x for x in labels if x]
    if not labels:
        raise ClipjaxError("no labels given")
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ClipjaxError(f"duplicate labels: {', '.join(dup)}")
    return labels


def resolve_templates(templates: str | Sequence[str] | None) -> list[str]:
    """None or "default" → the default set; "none" → the bare label; a built-in set
    name or a file; or a list of templates, each holding one `{}`."""
    if templates is None or templates == "default":
        return prompts_lib.load_templates(DEFAULT_TEMPLATES)
    if templates == "none":
        return list(NO_TEMPLATE)
    if isinstance(templates, str):
        return prompts_lib.load_templates(templates)
    templates = list(templates)
    if not templates:
        raise ClipjaxError("empty template list")
    prompts_lib.check_templates(templates)
    return templates


def build_classifier(model, labels: Sequence[str], templates=None) -> Classifier:
    """Embeds every label × template prompt with `model` and ensembles per label."""
    labels = list(labels)
    if not labels:
        raise ClipjaxError("no labels given")
    templates = resolve_templates(templates)
    weights = zeroshot.build_classifier(model.encode_texts, labels, templates)
    bias = getattr(model, "logit_bias", None)
    return Classifier(labels, templates, weights, float(math.exp(model.logit_scale)),
                      None if bias is None else float(bias))


def predict(classifier: Classifier, image_emb, *, top_k: int = 5,
            threshold: float | None = None, none_label: str = "none") -> list[Prediction]:
    """Top-k labels per image; with `threshold`, best cosine < threshold → `none_label`."""
    if top_k < 1:
        raise ClipjaxError(f"top_k must be >= 1, got {top_k}")
    cos = classifier.cosines(image_emb)
    probs = classifier.probabilities(cos)
    k = min(top_k, len(classifier.labels))
    out = []
    for c_row, p_row in zip(cos, probs):
        order = np.argsort(-p_row, kind="stable")[:k]
        best = int(np.argmax(c_row))
        passed = threshold is None or float(c_row[best]) >= threshold
        out.append(Prediction(
            label=classifier.labels[best] if passed else none_label,
            probability=float(p_row[best]), score=float(c_row[best]),
            top=[(classifier.labels[i], float(p_row[i]), float(c_row[i])) for i in order],
            flagged=passed))
    return out


def classify(model, images, labels: Sequence[str], templates=None, *, top_k: int = 5,
             threshold: float | None = None, none_label: str = "none") -> list[Prediction]:
    """Zero-shot predictions for `images` (anything `model.encode_images` takes)."""
    classifier = build_classifier(model, labels, templates)
    return predict(classifier, model.encode_images(images), top_k=top_k, threshold=threshold,
                   none_label=none_label)
