"""Evaluator math against brute-force numpy references: prompt ensembling, top-k and
per-class recall, retrieval Recall@K with ties and several captions, the linear probe."""

import numpy as np
import pytest

from clipjax.errors import ClipjaxError
from clipjax.evaluate import linear_probe, prompts, retrieval, zeroshot


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --------------------------------------------------------------------------- ensembling


def test_ensemble_matches_loop_reference():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(7, 5, 16)).astype(np.float32) * rng.uniform(0.1, 9, (7, 5, 1))
    ref = []
    for c in range(7):  # the CLIP notebook, written out
        per_template = [e / np.linalg.norm(e) for e in emb[c]]
        mean = np.mean(per_template, axis=0)
        ref.append(mean / np.linalg.norm(mean))
    np.testing.assert_allclose(zeroshot.ensemble(emb), np.stack(ref), rtol=1e-5, atol=1e-6)


def test_build_classifier_orders_prompts_class_major():
    seen = []

    def encode(texts):
        seen.extend(texts)
        return np.stack([np.eye(4)[len(t) % 4] + 0.1 for t in texts])

    clf = zeroshot.build_classifier(encode, ["cat", "dog", "ox"], ["a {}.", "the {} here"])
    assert seen == ["a cat.", "the cat here", "a dog.", "the dog here", "a ox.", "the ox here"]
    assert clf.shape == (3, 4)
    np.testing.assert_allclose(np.linalg.norm(clf, axis=1), 1.0, rtol=1e-6)


def test_classification_metrics_against_reference():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(200, 12))
    labels = rng.integers(0, 12, 200)
    labels[:5] = 11  # make sure some class is rare
    out = zeroshot.classification_metrics(scores, labels)
    order = np.argsort(-scores, axis=1)
    assert out["top1"] == pytest.approx(np.mean(order[:, 0] == labels))
    assert out["top5"] == pytest.approx(np.mean([labels[i] in order[i, :5] for i in range(200)]))
    pred = order[:, 0]
    recalls = [np.mean(pred[labels == c] == c) for c in range(12) if (labels == c).any()]
    assert out["mean_per_class_recall"] == pytest.approx(np.mean(recalls))


def test_accumulator_streams_like_one_batch_and_rejects_bad_labels():
    rng = np.random.default_rng(2)
    scores, labels = rng.normal(size=(90, 6)), rng.integers(0, 6, 90)
    acc = zeroshot.Accumulator(6)
    for i in range(0, 90, 32):
        acc.update(scores[i:i + 32], labels[i:i + 32])
    assert acc.metrics() == pytest.approx(zeroshot.classification_metrics(scores, labels))
    assert acc.cm.sum() == 90
    with pytest.raises(ValueError, match="labels must lie"):
        acc.update(scores[:2], np.array([0, 6]))


def test_top5_with_fewer_than_five_classes_is_one():
    scores = np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3]])
    out = zeroshot.classification_metrics(scores, np.array([2, 1]))
    assert out["top1"] == 0.0 and out["top5"] == 1.0


# --------------------------------------------------------------------------- retrieval


def _brute_force_recall(img, txt, text_image, k):
    """Full stable sorts: ties go to the lower index."""
    n, m = len(img), len(txt)
    s = img @ txt.T
    i2t = []
    for i in range(n):
        order = np.argsort(-s[i], kind="stable")[:k]
        i2t.append(any(text_image[j] == i for j in order))
    t2i = []
    for j in range(m):
        order = np.argsort(-s[:, j], kind="stable")[:k]
        t2i.append(text_image[j] in order)
    return np.mean(i2t), np.mean(t2i)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_brute_force_with_ties_and_multiple_captions(seed):
    rng = np.random.default_rng(seed)
    n = 40
    captions_per_image = rng.integers(1, 6, n)  # 1..5 captions each
    text_image = np.repeat(np.arange(n), captions_per_image)
    rng.shuffle(text_image)
    # Coarsely quantised embeddings: many exactly tied scores.
    img = np.round(rng.normal(size=(n, 4)) * 1.5).astype(np.float32)
    txt = np.round(img[text_image] + rng.normal(size=(len(text_image), 4))).astype(np.float32)
    txt[:10] = txt[10]  # several identical captions
    out = retrieval.recall_at_k(img, txt, text_image, ks=(1, 5, 10), block=7)
    for k in (1, 5, 10):
        ref_i2t, ref_t2i = _brute_force_recall(img, txt, text_image, k)
        assert out[f"image_to_text_R@{k}"] == pytest.approx(ref_i2t), k
        assert out[f"text_to_image_R@{k}"] == pytest.approx(ref_t2i), k


def test_recall_any_positive_counts_and_ties_break_by_index():
    img = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    # image 0 has captions 1 and 2; caption 1 is far off, caption 2 is the best match.
    txt = np.array([[0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]], np.float32)
    out = retrieval.recall_at_k(img, txt, [1, 0, 0], ks=(1,))
    assert out["image_to_text_R@1"] == 1.0
    # All scores tie: rank order is the index order, so only index-0 targets hit at K=1.
    same = np.ones((2, 2), np.float32)
    out = retrieval.recall_at_k(same, same, [1, 0], ks=(1, 2))
    assert out["image_to_text_R@1"] == 0.5  # image 0's caption is text 1: behind text 0
    assert out["text_to_image_R@1"] == 0.5
    assert out["image_to_text_R@2"] == 1.0


def test_recall_rejects_images_without_captions():
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval.recall_at_k(np.eye(3), np.eye(3)[:2], [0, 1])


# --------------------------------------------------------------------------- linear probe


def test_linear_probe_solves_the_regularised_problem():
    rng = np.random.default_rng(3)
    c, d = 4, 8
    centers = rng.normal(size=(c, d)) * 2
    y = rng.integers(0, c, 400)
    x = (centers[y] + rng.normal(size=(400, d))).astype(np.float32)
    l2 = 1e-2
    w, b = linear_probe.fit(x, y, c, l2, steps=200)
    # Stationarity of the convex objective: the gradient at the solution vanishes.
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(400), y] -= 1
    grad_w = x.T @ p / 400 + l2 * w
    grad_b = p.mean(0)
    assert np.abs(grad_w).max() < 1e-3 and np.abs(grad_b).max() < 1e-3
    yt = rng.integers(0, c, 200)
    xt = (centers[yt] + rng.normal(size=(200, d))).astype(np.float32)
    out = linear_probe.evaluate(x, y, xt, yt, c, l2_grid=(1e-4, 1e-2, 1.0, 100.0))
    assert out["top1"] > 0.85  # near Bayes-optimal on well separated clusters
    assert out["l2"] < 100.0  # an absurdly strong penalty is never the best


# --------------------------------------------------------------------------- prompts


def test_builtin_lists_are_complete():
    sizes = {"imagenet1k": 1000, "cifar10": 10, "cifar100": 100, "mnist": 10,
             "fashion_mnist": 10, "stl10": 10, "food101": 101, "oxford_pets": 37,
             "flowers102": 102}
    for name, n in sizes.items():
        assert len(prompts.load_classnames(name)) == n, name
    assert len(prompts.load_templates("imagenet1k")) == 80
    assert len(prompts.load_templates("imagenet1k_simple")) == 7
    assert prompts.load_classnames("imagenet1k")[0] == "tench"


def test_user_files_text_and_json(tmp_path):
    (tmp_path / "t.txt").write_text("# held-out prompts\na sketch of a {}.\n\nart of the {}\n")
    assert prompts.load_templates(str(tmp_path / "t.txt")) == ["a sketch of a {}.", "art of the {}"]
    (tmp_path / "c.json").write_text('{"classnames": ["a {b}", "c"]}')
    names = prompts.load_classnames(str(tmp_path / "c.json"))
    assert prompts.prompts(names, ["x {}"]) == ["x a {b}", "x c"]
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    with pytest.raises(ClipjaxError, match="exactly one"):
        prompts.load_templates(str(tmp_path / "bad.txt"))
    with pytest.raises(ClipjaxError, match="built-in"):
        prompts.load_templates("no_such_set")
