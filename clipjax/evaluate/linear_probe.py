"""Linear probe: multinomial logistic regression on frozen image embeddings.

As in the CLIP paper, the L2 strength is swept on a validation split carved
out of the training embeddings, then the model is refit on all of them with
the best strength and scored on the test split. The fit is full-batch L-BFGS
(optax) inside one jitted scan, so every strength reuses one compilation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipjax.evaluate import zeroshot

DEFAULT_L2 = tuple(10.0 ** e for e in range(-6, 2))  # 1e-6 … 10


def _loss(params, x, y, l2):
    w, b = params
    logits = x @ w + b
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 0.5 * l2 * jnp.sum(w * w)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit(x, y, l2, *, num_classes: int, steps: int):
    params = (jnp.zeros((x.shape[1], num_classes), x.dtype), jnp.zeros((num_classes,), x.dtype))
    loss = lambda p: _loss(p, x, y, l2)
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(p, updates), state), value

    (params, _), values = jax.lax.scan(step, (params, opt.init(params)), length=steps)
    return params, values[-1]


def fit(features: np.ndarray, labels: np.ndarray, num_classes: int, l2: float,
        steps: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Weights [D, C] and bias [C] of an L2-regularised softmax regression."""
    x = jnp.asarray(features, jnp.float32)
    y = jnp.asarray(labels, jnp.int32)
    (w, b), _ = _fit(x, y, jnp.float32(l2), num_classes=num_classes, steps=steps)
    return np.asarray(w), np.asarray(b)


def predict_scores(features: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray(features, np.float32) @ w + b


def _split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def evaluate(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
             num_classes: int, *, l2_grid: Sequence[float] = DEFAULT_L2,
             val_fraction: float = 0.2, steps: int = 100, seed: int = 0) -> dict[str, float]:
    """Chooses the L2 strength on a validation split, refits, and scores the test split."""
    train_x = np.asarray(train_x, np.float32)
    train_y = np.asarray(train_y, np.int64)
    if len(train_x) < 2:
        raise ValueError("a linear probe needs at least two training examples")
    fit_idx, val_idx = _split(len(train_x), val_fraction, seed)
    best_l2, best_acc = None, -1.0
    val_acc = {}
    for l2 in sorted(l2_grid, reverse=True):  # on a tie the stronger regulariser wins
        w, b = fit(train_x[fit_idx], train_y[fit_idx], num_classes, l2, steps)
        pred = predict_scores(train_x[val_idx], w, b).argmax(axis=1)
        acc = float((pred == train_y[val_idx]).mean())
        val_acc[l2] = acc
        if acc > best_acc:
            best_l2, best_acc = l2, acc
    w, b = fit(train_x, train_y, num_classes, best_l2, steps)
    out = zeroshot.classification_metrics(predict_scores(test_x, w, b), test_y, num_classes)
    out["l2"] = float(best_l2)
    out["val_top1"] = best_acc
    return out
