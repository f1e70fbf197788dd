"""Contrastive image-text losses: softmax (CLIP) and sigmoid (SigLIP), dense or ring.

`contrastive_loss` is the one entry point; `config.loss.*` picks its options:

- kind: "softmax" = symmetric InfoNCE, the mean of the image->text and text->image
  cross-entropies; "sigmoid" = SigLIP, -log sigmoid(z * logit) summed over all B^2
  pairs and divided by the global batch B (z = +1 on positives, -1 elsewhere).
- impl: "dense" all-gathers both towers (O(b*B) memory per device, the
  reference); "ring" passes caption chunks around the batch axes with a custom
  VJP (O(b^2 + b*d) per device, flat in B). Both give the same loss and gradients.
- positives: "index" (only the pair itself), "caption" (every pair whose caption
  hash `ids` matches) or "label" (every pair whose class ids `ids` match): uniform
  soft targets for softmax, z = +1 for sigmoid.
- chunk: the ring tiles each visiting chunk into `chunk` captions (O(b*chunk)).

logits = exp(min(logit_scale, logit_scale_max)) * cos_sim + logit_bias. As in
CLIP, the scale is clamped: above the max its gradient is zero.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from clipjax.errors import ClipjaxError
from clipjax.losses.common import axes_of, caption_ids
from clipjax.losses.dense import dense_loss
from clipjax.losses.ring import ring_loss

__all__ = ["contrastive_loss", "caption_ids", "options", "KINDS", "IMPLS", "POSITIVES"]

KINDS = ("softmax", "sigmoid")
IMPLS = {"dense": dense_loss, "ring": ring_loss}
POSITIVES = ("index", "caption", "label")


def _choice(name, value, options):
    if value not in options:
        raise ClipjaxError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")


def _scalar(name, value):
    value = jnp.asarray(value)
    if value.size != 1:
        raise ClipjaxError(f"{name} must be a scalar; got shape {value.shape}")
    return jnp.reshape(value, ()).astype(jnp.float32)


def contrastive_loss(img_emb, txt_emb, logit_scale, logit_bias=None, *, kind="softmax",
                     impl="dense", mesh=None, batch_axes=("data",), ids=None,
                     positives="index", chunk=0, logit_scale_max=math.log(100.0)):
    """Returns (loss, metrics) for L2-normalised embeddings img_emb, txt_emb [B, d].

    The batch dimension is sharded over `batch_axes` of `mesh` (one or several
    axes; mesh=None: one device). `logit_scale` is the raw log-scale parameter;
    `logit_bias` (optional) is added to every logit. `ids` int [B] (sharded like
    the embeddings) is needed for positives="caption" (see `caption_ids`) and "label"
    (the samples' class ids).
    Computed in float32. Differentiable in the embeddings, scale and bias; works
    under jit. metrics: i2t_acc, t2i_acc (in-batch top-1: the best-scoring
    partner is a positive), logit_scale (exponentiated, clamped), logit_bias
    (when given or kind="sigmoid") and positives (mean per sample, caption and label modes).
    """
    _choice("loss.kind", kind, KINDS)
    _choice("loss.impl", impl, tuple(IMPLS))
    _choice("loss.positives", positives, POSITIVES)
    if img_emb.ndim != 2 or img_emb.shape != txt_emb.shape:
        raise ClipjaxError(
            f"contrastive_loss needs img_emb and txt_emb of one shape [B, d]; "
            f"got {img_emb.shape} and {txt_emb.shape}")
    n = img_emb.shape[0]
    if mesh is not None:
        names = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
        missing = [a for a in names if a not in mesh.shape]
        if missing or not names:
            raise ClipjaxError(
                f"batch_axes {names} must be axes of the mesh {tuple(mesh.axis_names)}")
    axes = axes_of(mesh, batch_axes)
    if n % axes.size:
        raise ClipjaxError(
            f"the global batch {n} does not split over {axes.size} devices of {axes.name}")
    if positives in ("caption", "label"):
        if ids is None:
            where = ("see clipjax.losses.caption_ids" if positives == "caption"
                     else "the batch's class labels")
            raise ClipjaxError(f"positives={positives!r} needs ids ({where})")
        ids = jnp.asarray(ids)
        if ids.shape != (n,):
            raise ClipjaxError(f"ids must have shape ({n},); got {ids.shape}")
        ids = ids.astype(jnp.int32)
    else:
        ids = jnp.arange(n, dtype=jnp.int32)

    scale = jnp.exp(jnp.minimum(_scalar("logit_scale", logit_scale), logit_scale_max))
    bias = jnp.zeros((), jnp.float32) if logit_bias is None else _scalar("logit_bias", logit_bias)
    options = {"kind": kind, "mesh": mesh, "axes": axes}
    if impl == "ring":
        options["chunk"] = int(chunk)
    x, y = img_emb.astype(jnp.float32), txt_emb.astype(jnp.float32)
    loss, i2t, t2i, count = IMPLS[impl](x, y, ids, scale, bias, **options)

    metrics = {"i2t_acc": i2t, "t2i_acc": t2i, "logit_scale": scale}
    if logit_bias is not None or kind == "sigmoid":
        metrics["logit_bias"] = bias
    if positives != "index":
        metrics["positives"] = count
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def options(loss_config) -> dict:
    """contrastive_loss keyword arguments from `config.loss`: `contrastive_loss(img, txt, scale,
    bias, mesh=mesh, batch_axes=..., ids=..., **options(config.loss))`."""
    return {"kind": loss_config.kind, "impl": loss_config.impl,
            "positives": loss_config.positives, "chunk": int(loss_config.chunk),
            "logit_scale_max": float(loss_config.logit_scale_max)}
