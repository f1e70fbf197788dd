"""Zero-shot classification with your own labels, threshold calibration and CLIPScore,
checked against numpy references on real photos with a tiny random CLIP."""

import math

import numpy as np
import pytest
from apps_data import tiny_model, write_photos

from clipjax.apps import calibrate, classify, clipscore
from clipjax.errors import ClipjaxError

LABELS = ["a cat", "a rocket", "an astronaut", "coffee", "the moon"]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(str(tmp_path_factory.mktemp("photos")))


def _normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference_probs(model, paths, labels, templates):
    """CLIP's recipe, written out: prompt embeddings → per-label mean → softmax(T·cos)."""
    prompts = [t.replace("{}", lab) for lab in labels for t in templates]
    emb = model.encode_texts(prompts).reshape(len(labels), len(templates), -1)
    weights = _normalize(_normalize(emb).mean(axis=1))
    cos = model.encode_images(paths) @ weights.T
    logits = math.exp(model.logit_scale) * cos
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return cos, e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("templates", [None, ["a photo of {}.", "{} in the wild"], "none"])
def test_probabilities_equal_numpy_reference(model, photos, templates):
    resolved = classify.resolve_templates(templates)
    assert len(resolved) == (7 if templates is None else 1 if templates == "none" else 2)
    cos, probs = _reference_probs(model, photos, LABELS, resolved)
    preds = classify.classify(model, photos, LABELS, templates, top_k=len(LABELS))
    for pred, c_row, p_row in zip(preds, cos, probs):
        got = dict((lab, p) for lab, p, _ in pred.top)
        np.testing.assert_allclose([got[lab] for lab in LABELS], p_row, rtol=1e-5, atol=1e-7)
        assert [lab for lab, _, _ in pred.top] == [LABELS[i] for i in np.argsort(-p_row)]
        assert pred.label == LABELS[int(np.argmax(p_row))]
        assert pred.score == pytest.approx(float(c_row.max()), abs=1e-6)
        assert sum(p for _, p, _ in pred.top) == pytest.approx(1.0, abs=1e-5)
    assert len(preds) == len(photos)


def test_threshold_gives_none_label(model, photos):
    classifier = classify.build_classifier(model, LABELS, "none")
    emb = model.encode_images(photos)
    best = classifier.cosines(emb).max(axis=1)
    threshold = float(np.median(best))
    preds = classify.predict(classifier, emb, top_k=2, threshold=threshold, none_label="other")
    for pred, b in zip(preds, best):
        assert (pred.label == "other") == (b < threshold) == (not pred.flagged)
        assert len(pred.top) == 2
    assert any(p.label == "other" for p in preds) and any(p.label != "other" for p in preds)


def test_sigmoid_models_give_independent_probabilities():
    c = classify.Classifier(["a", "b"], ["{}"], np.eye(2, dtype=np.float32), 10.0, bias=-2.0)
    probs = c.probabilities(np.array([[0.5, -0.1]], np.float32))
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-(10 * np.array([[0.5, -0.1]]) - 2))),
                               rtol=1e-6)


def test_choose_threshold_matches_brute_force():
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c"]
    for trial in range(20):
        n = 40
        scores = np.round(rng.uniform(0, 1, n), 2)  # rounding makes ties
        truth = [labels[i] if i < 3 else None for i in rng.integers(0, 4, n)]
        noisy = rng.uniform(size=n) < (1 - scores) * 0.6  # low scores are wrong more often
        predicted = [t if (t is not None and not x) else labels[(trial + i) % 3]
                     for i, (t, x) in enumerate(zip(truth, noisy))]
        correct = np.array([p == t for p, t in zip(predicted, truth)])
        target = 0.8
        feasible = []
        for t in sorted(set(scores)):
            flagged = scores >= t
            if correct[flagged].mean() >= target:
                feasible.append(t)
        if not feasible:
            with pytest.raises(ClipjaxError, match="no threshold reaches"):
                calibrate.choose_threshold(scores, predicted, truth, target)
            continue
        result = calibrate.choose_threshold(scores, predicted, truth, target)
        lowest = min(feasible)
        flagged = scores >= result.threshold
        np.testing.assert_array_equal(flagged, scores >= lowest)  # same flags as brute force
        assert result.precision == pytest.approx(correct[flagged].mean())
        assert result.recall == pytest.approx(correct[flagged].sum() / sum(
            t is not None for t in truth))
        assert result.precision >= target


def test_calibrate_on_labelled_folder(model, tmp_path):
    # One folder per label plus a folder of images of no label.
    layout = {"a_cat": ["chelsea"], "Rocket": ["rocket"], "the-moon": ["moon", "coins"],
              "none": ["camera", "horse", "page"]}
    for sub, names in layout.items():
        write_photos(str(tmp_path / sub), names, nested=False)
    labels = ["a cat", "rocket", "the moon"]
    paths, truth, negatives = calibrate.labelled_images(str(tmp_path), labels)
    assert negatives == ["none"] and len(paths) == 7
    assert sorted(t for t in truth if t) == ["a cat", "rocket", "the moon", "the moon"]
    classifier = classify.build_classifier(model, labels, None)
    emb = model.encode_images(paths)
    result = calibrate.calibrate(classifier, emb, truth, 0.01)
    cos = classifier.cosines(emb)
    pred = [labels[i] for i in cos.argmax(axis=1)]
    correct = np.array([p == t for p, t in zip(pred, truth)])
    flagged = cos.max(axis=1) >= result.threshold
    assert result.flagged == flagged.sum() and result.correct == (correct & flagged).sum()
    with pytest.raises(ClipjaxError, match="no sub-folder named like a label"):
        calibrate.labelled_images(str(tmp_path), ["dog"])


def test_clipscore_is_w_times_positive_cosine(model, photos):
    texts = ["a cat", "a rocket", "a cup of coffee"]
    scores = clipscore.score(model, photos[:3], texts)
    cos = np.sum(model.encode_images(photos[:3]) * model.encode_texts(texts), axis=1)
    np.testing.assert_allclose(scores.cosine, cos, atol=1e-6)
    np.testing.assert_allclose(scores.per_pair, 2.5 * np.maximum(cos, 0), atol=1e-6)
    assert scores.mean == pytest.approx(float(np.mean(2.5 * np.maximum(cos, 0))), abs=1e-6)
    neg = clipscore.clip_score(np.array([[1.0, 0.0]]), np.array([[-1.0, 0.0]]))
    assert neg.tolist() == [0.0]
    with pytest.raises(ClipjaxError, match="2 images but 1 texts"):
        clipscore.score(model, photos[:2], ["one"])


def test_read_pairs(tmp_path):
    (tmp_path / "p.tsv").write_text("image\tprompt\na.png\ta red car\n\nsub/b.jpg\tx\ty\n")
    pairs = clipscore.read_pairs(str(tmp_path / "p.tsv"))
    assert pairs == [(str(tmp_path / "a.png"), "a red car"),
                     (str(tmp_path / "sub" / "b.jpg"), "x\ty")]
    (tmp_path / "bad.tsv").write_text("only-an-image.png\n")
    with pytest.raises(ClipjaxError, match="bad.tsv:1"):
        clipscore.read_pairs(str(tmp_path / "bad.tsv"))


def test_label_and_template_errors():
    assert classify.parse_labels(" cat , dog,,car ") == ["cat", "dog", "car"]
    with pytest.raises(ClipjaxError, match="duplicate"):
        classify.parse_labels("cat,cat")
    with pytest.raises(ClipjaxError, match="exactly one"):
        classify.resolve_templates(["a photo"])
    with pytest.raises(ClipjaxError, match="neither a file nor a built-in"):
        classify.resolve_templates("no_such_set")


def test_clip_model_methods_delegate_to_the_apps(model, photos, tmp_path):
    from clipjax.apps import search
    from clipjax.apps.embedding_cache import EmbeddingCache

    preds = model.classify(photos[:2], LABELS, "none", top_k=2)
    want = classify.classify(model, photos[:2], LABELS, "none", top_k=2)
    assert [p.to_json() for p in preds] == [p.to_json() for p in want]
    texts = ["a cat", "a rocket"]
    np.testing.assert_array_equal(model.score(photos[:2], texts).per_pair,
                                  clipscore.score(model, photos[:2], texts).per_pair)
    EmbeddingCache.open_or_empty(str(tmp_path / "idx")).update(model, photos, progress=False)
    index = search.ImageIndex.open(str(tmp_path / "idx"))
    assert model.search(index, photos[3], k=1)[0].path == photos[3]  # image path query
    text_hits = model.search(str(tmp_path / "idx"), "a cat", k=3)
    assert text_hits == search.search(model, index, "a cat", k=3)
