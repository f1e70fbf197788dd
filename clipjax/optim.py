"""The optax optimizer a config describes: schedule, weight-decay mask, clipping, freezing.

`config.optim.name` picks AdamW (β2 = 0.98 by default, as CLIP), Adafactor,
Lion or SGD with momentum; the learning rate warms up linearly and then
follows a cosine, linear or constant schedule. Weight decay applies only to
matrices that are not embeddings (no biases, norms, embeddings, logit
scale/bias). Params whose path fully matches `config.optim.frozen` get
`set_to_zero` through `optax.multi_transform`, so they carry no optimizer
state at all, and the train step does not differentiate them.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax
from ml_collections import ConfigDict

from clipjax.config import ConfigError

TRAIN, FROZEN = "train", "frozen"


def path_str(path) -> str:
    """'image/blocks_0/attn/kernel' for a tree path (dict keys joined by '/')."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def paths(tree: Any) -> Any:
    """A tree of the same structure holding each leaf's path string."""
    return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p), tree)


def schedule(optim: ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup to `optim.lr`, then cosine / linear decay to `optim.end_lr`, or flat.

    The warmup starts at 0 (`optim.warmup_init='zero'`: step s gets lr·s/W) or one step
    in (`'one_step'`: lr·(s+1)/W, as open_clip's trainer, whose first update is not a no-op).
    """
    warmup = min(int(optim.warmup_steps), max(total_steps - 1, 0))
    lr, end = float(optim.lr), float(optim.end_lr)
    decay_steps = max(total_steps - warmup, 1)
    if optim.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif optim.schedule == "linear":
        after = optax.linear_schedule(lr, end, decay_steps)
    else:
        after = optax.constant_schedule(lr)
    if warmup == 0:
        return after
    if optim.get("warmup_init", "zero") == "one_step":
        def warm(count):
            return lr * (count + 1) / warmup
    else:
        warm = optax.linear_schedule(0.0, lr, warmup)
    return optax.join_schedules([warm, after], [warmup])


def decay_mask(params: Any, no_decay: str) -> Any:
    """True for the leaves weight decay applies to: ≥2-d and not matching `no_decay`."""
    pattern = re.compile(no_decay) if no_decay else None
    return jax.tree_util.tree_map_with_path(
        lambda p, x: len(x.shape) >= 2 and not (pattern and pattern.search(path_str(p))), params)


def frozen_labels(params: Any, frozen: str) -> Any:
    """'frozen' for leaves whose path fully matches the regex, 'train' for the others."""
    pattern = re.compile(frozen) if frozen else None
    return jax.tree_util.tree_map_with_path(
        lambda p, _: FROZEN if pattern and pattern.fullmatch(path_str(p)) else TRAIN, params)


def trainable_mask(params: Any, frozen: str) -> Any:
    return jax.tree.map(lambda label: label == TRAIN, frozen_labels(params, frozen))


def check_frozen(params: Any, frozen: str) -> None:
    """A freezing regex that matches nothing is a typo; one that matches everything, too."""
    if not frozen:
        return
    labels = jax.tree.leaves(frozen_labels(params, frozen))
    if FROZEN not in labels:
        raise ConfigError("optim.frozen", f"{frozen!r} matches no param path")
    if TRAIN not in labels:
        raise ConfigError("optim.frozen", f"{frozen!r} freezes every param")


def _base(optim: ConfigDict, lr: optax.Schedule, mask) -> optax.GradientTransformation:
    wd = float(optim.weight_decay)
    if optim.name == "adamw":
        return optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=wd, mask=mask)
    if optim.name == "lion":
        return optax.lion(lr, b1=optim.b1, b2=optim.b2, weight_decay=wd, mask=mask)
    if optim.name == "adafactor":
        return optax.adafactor(lr, weight_decay_rate=wd or None, weight_decay_mask=mask)
    if optim.name == "sgd":
        return optax.chain(optax.add_decayed_weights(wd, mask),
                           optax.sgd(lr, momentum=optim.b1 or None))
    raise ConfigError("optim.name", f"unknown optimizer {optim.name!r}")


def build(config: ConfigDict) -> optax.GradientTransformation:
    """The full transformation: clip by global norm → optimizer (+ masked weight decay) → lr.

    Masks are functions of the params tree, so the same object serves any
    params (abstract or concrete) of the model the config describes.
    """
    optim = config.optim
    lr = schedule(optim, int(config.train.steps))
    tx = _base(optim, lr, lambda p: decay_mask(p, optim.no_decay))
    if optim.clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(float(optim.clip_norm)), tx)
    if optim.frozen:
        tx = optax.multi_transform({TRAIN: tx, FROZEN: optax.set_to_zero()},
                                   lambda p: frozen_labels(p, optim.frozen))
    return tx
