"""The pure train step: loss and gradients (whole batch or GradCache), update, metrics.

A contrastive loss couples every pair in the global batch, so gradient
accumulation cannot just sum micro-batch losses. With `train.grad_accum = k`
the step does it the GradCache way (Gao et al. 2021):

1. embed each of the k micro-batches with no gradient (no activations kept);
2. compute the loss over the whole batch and its gradient w.r.t. the
   embeddings (and logit scale/bias);
3. for each micro-batch, re-run its towers under `jax.vjp` and pull the
   embedding cotangents back into the params, summing over micro-batches.

The result equals the gradient of one step on the whole batch; peak
activation memory is that of one micro-batch. Frozen params (`optim.frozen`)
enter the towers under `stop_gradient`, so their backward pass is never built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from clipjax import losses
from clipjax.train.state import TrainState, update_ema


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What the step needs besides state and batch (static: hashable closures over config)."""

    model: Any
    tx: optax.GradientTransformation
    lr: optax.Schedule
    loss_cfg: ConfigDict
    mesh: Mesh
    batch_axes: tuple[str, ...]
    trainable: Any  # pytree of bools like the params (False = frozen)
    grad_accum: int = 1
    image_mean: tuple[float, ...] = (0.0, 0.0, 0.0)  # for uint8 batches, normalised here
    image_std: tuple[float, ...] = (1.0, 1.0, 1.0)
    # train.nonfinite='stop': after the first non-finite step the state stays frozen, so the
    # loop can look for it every few steps (no per-step device_get) and save that state.
    freeze_after_nonfinite: bool = False
    ema_decay: float = 0.0  # train.ema_decay (the state holds an EMA when > 0)


def normalize_images(images: jax.Array, mean, std) -> jax.Array:
    """uint8 pixels → float32 `(x / 255 - mean) / std` on the device (the host sends a
    quarter of the bytes); float images pass through as they are. Applied where a
    (micro-)batch enters the model, so GradCache holds one float micro-batch at a time."""
    if images.dtype != jnp.uint8:
        return images
    x = images.astype(jnp.float32) / jnp.float32(255.0)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def _positive_ids(spec: StepSpec, batch):
    """The ids whose equality makes a pair positive: caption hashes, class labels, or
    None (only the pair itself)."""
    if spec.loss_cfg.positives == "caption":
        return losses.caption_ids(batch["text"])
    if spec.loss_cfg.positives == "label":
        return batch["label"]
    return None


def _loss(spec: StepSpec, img_emb, txt_emb, scale, bias, ids):
    return losses.contrastive_loss(img_emb, txt_emb, scale, bias, mesh=spec.mesh,
                                   batch_axes=spec.batch_axes, ids=ids,
                                   **losses.options(spec.loss_cfg))


def _freeze(params, trainable):
    return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)


def _embed(spec: StepSpec, params, images, text, keep=None):
    images = normalize_images(images, spec.image_mean, spec.image_std)
    return spec.model.apply(
        {"params": params}, images, text, keep,
        method=lambda m, i, t, k: (m.encode_image(i, keep=k), m.encode_text(t)))


def whole_batch_grads(spec: StepSpec, params, batch):
    """(loss, metrics), grads of one forward/backward over the whole batch."""

    def loss_fn(p):
        p = _freeze(p, spec.trainable)
        images = normalize_images(batch["image"], spec.image_mean, spec.image_std)
        out = spec.model.apply({"params": p}, images, batch["text"], batch.get("patches"))
        return _loss(spec, out["image_emb"], out["text_emb"], out["logit_scale"],
                     out["logit_bias"], _positive_ids(spec, batch))

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


def _split(x, k: int, mesh: Mesh, axes):
    """[B, ...] → [k, B/k, ...]: micro-batch j = rows j, j+k, ...; each stays split over `axes`
    with no data movement (every device's rows regroup locally)."""
    lead = axes if len(axes) != 1 else axes[0]
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
    x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(lead or None)))
    x = jnp.swapaxes(x, 0, 1)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, lead or None)))


def _merge(x, mesh: Mesh, axes):
    """Inverse of `_split`: [k, B/k, ...] → [B, ...] in the original row order."""
    lead = axes if len(axes) != 1 else axes[0]
    x = jnp.swapaxes(x, 0, 1)
    x = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(lead or None)))


def gradcache_grads(spec: StepSpec, params, batch):
    """(loss, metrics), grads equal to `whole_batch_grads`, in `spec.grad_accum` micro-batches."""
    k, mesh, axes = spec.grad_accum, spec.mesh, spec.batch_axes
    frozen_aware = _freeze(params, spec.trainable)
    images = _split(batch["image"], k, mesh, axes)
    texts = _split(batch["text"], k, mesh, axes)
    keeps = _split(batch["patches"], k, mesh, axes) if "patches" in batch else None

    def embed_one(_, mb):
        return None, _embed(spec, jax.lax.stop_gradient(params), *mb)

    _, (img_emb, txt_emb) = jax.lax.scan(embed_one, None, (images, texts, keeps))
    img_emb, txt_emb = _merge(img_emb, mesh, axes), _merge(txt_emb, mesh, axes)

    bias = params.get("logit_bias")
    (loss, metrics), (g_img, g_txt, g_scale, g_bias) = jax.value_and_grad(
        lambda i, t, s, b: _loss(spec, i, t, s, b, _positive_ids(spec, batch)),
        argnums=(0, 1, 2, 3), has_aux=True)(img_emb, txt_emb, params["logit_scale"], bias)
    g_img, g_txt = _split(g_img, k, mesh, axes), _split(g_txt, k, mesh, axes)

    def backprop_one(acc, mb):
        img, txt, keep, gi, gt = mb
        _, pull = jax.vjp(lambda p: _embed(spec, p, img, txt, keep), frozen_aware)
        (g,) = pull((gi, gt))
        return jax.tree.map(jnp.add, acc, g), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(backprop_one, zeros, (images, texts, keeps, g_img, g_txt))
    grads = dict(grads)
    if spec.trainable["logit_scale"]:
        grads["logit_scale"] = grads["logit_scale"] + g_scale
    if bias is not None and spec.trainable["logit_bias"]:
        grads["logit_bias"] = grads["logit_bias"] + g_bias
    return (loss, metrics), grads


def _where(ok, new, old):
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def train_step(spec: StepSpec, state: TrainState, batch: dict[str, jax.Array]):
    """One optimizer step → (new state, metrics). Pure; jit it with the state donated.

    A non-finite loss or gradient leaves params and optimizer state as they
    were, counts the step in `state.nonfinite` and reports `skipped = 1`. With
    `spec.freeze_after_nonfinite`, a state that already counts one is returned
    unchanged (step included) and reports `frozen = 1`.
    """
    if spec.grad_accum > 1:
        (loss, metrics), grads = gradcache_grads(spec, state.params, batch)
    else:
        (loss, metrics), grads = whole_batch_grads(spec, state.params, batch)
    trainable_grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads,
                                   spec.trainable)
    grad_norm = optax.tree.norm(trainable_grads)
    updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    frozen = (state.nonfinite > 0) if spec.freeze_after_nonfinite else jnp.bool_(False)
    ok = finite & ~frozen
    applied = state.step - state.nonfinite  # the optimizer's own step count
    new = TrainState(
        step=state.step + jnp.where(frozen, 0, 1).astype(state.step.dtype),
        params=_where(ok, params, state.params),
        opt_state=_where(ok, opt_state, state.opt_state),
        nonfinite=state.nonfinite + jnp.where(finite | frozen, 0, 1).astype(jnp.int32))
    if state.ema is not None:  # a skipped step leaves the average where it was
        new = new.replace(ema=_where(ok, update_ema(spec.ema_decay, state.ema, new.params),
                                     state.ema))
    out = {
        "loss": loss,
        "lr": spec.lr(applied),
        "grad_norm": grad_norm,
        "skipped": jnp.where(finite | frozen, 0, 1).astype(jnp.int32),
        "nonfinite_steps": new.nonfinite,
        **metrics,
    }
    if spec.freeze_after_nonfinite:
        out["frozen"] = frozen.astype(jnp.int32)
    return new, out


def make_step(spec: StepSpec, shardings: TrainState,
              batch_shardings: dict[str, NamedSharding]) -> Callable:
    """`jax.jit(train_step)` with explicit in/out shardings and the state donated."""
    rep = NamedSharding(spec.mesh, P())
    return jax.jit(
        lambda state, batch: train_step(spec, state, batch),
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, rep),
        donate_argnums=(0,))
