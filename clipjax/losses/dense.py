"""The dense contrastive loss: all-gather both towers, each device computes its b x B blocks.

This is open_clip's `--local-loss --gather-with-grad`: memory O(b*B) per device,
gradients flow through the all-gather (its transpose is a reduce-scatter). It is
the reference the ring implementation is tested against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from clipjax.losses.common import BatchAxes, conform


def _local(x, y, ids, s, t, *, kind: str, axes: BatchAxes):
    """Per-device loss over local rows x, y [b, d] against the gathered batch.

    Returns the global (loss, i2t correct, t2i correct, positives) sums, replicated.
    """
    xs, ys, all_ids = axes.all_gather(x), axes.all_gather(y), axes.all_gather(ids)
    n = xs.shape[0]
    img_logits = s * (x @ ys.T) + t  # [b, B]: local images against every caption
    txt_logits = s * (y @ xs.T) + t  # [b, B]: local captions against every image
    pos = ids[:, None] == all_ids[None, :]  # the same mask for both: a pair shares one id
    count = pos.sum(axis=1).astype(x.dtype)
    if kind == "softmax":

        def ce(logits):
            target = jnp.where(pos, logits, 0.0).sum(axis=1) / count
            return jax.nn.logsumexp(logits, axis=1) - target

        local = 0.5 * (ce(img_logits).sum() + ce(txt_logits).sum())
    else:
        z = jnp.where(pos, 1.0, -1.0)
        local = -jax.nn.log_sigmoid(z * img_logits).sum()  # every pair once, over devices
        txt_logits = jax.lax.stop_gradient(txt_logits)  # only the t2i metric needs it

    def correct(logits):
        best = all_ids[jnp.argmax(logits, axis=1)]
        return (best == ids).sum().astype(x.dtype)

    stats = (local, correct(img_logits), correct(txt_logits), count.sum())
    return tuple(axes.psum(v) / n for v in stats)


def dense_loss(x, y, ids, s, t, *, kind: str, mesh, axes: BatchAxes):
    """(loss, i2t_acc, t2i_acc, mean positives per sample) for global x, y [B, d]."""
    local = functools.partial(_local, kind=kind, axes=axes)
    if mesh is None:
        return local(x, y, ids, s, t)
    specs = (P(axes.name, None), P(axes.name, None), P(axes.name), P(), P())
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=True)(
        *conform(mesh, (x, y, ids, s, t), specs))
