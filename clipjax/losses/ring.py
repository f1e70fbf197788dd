"""The ring contrastive loss: caption chunks travel around the batch axes, memory flat in B.

Each device keeps its b images. The b captions of every device visit it in
turn (`ppermute`, one step per device); the device scores its images against
the visiting chunk and folds the block into running statistics:

- per image row (stays home): online log-sum-exp, the sum and count of positive
  logits, the best score and its id (i2t accuracy);
- per caption column (travels *with* its chunk, so it returns home complete
  after a full turn): the same, for t2i;
- sigmoid: the block's summed -log sigmoid(z * logit).

The backward pass is a `jax.custom_vjp` that sends the chunks around again,
recomputes each block from the saved log-sum-exps, and lets each caption's
gradient accumulator ride along with it. Nothing of size b x B or B x d is ever
held: per device memory is O(b*c + b*d), c = `chunk` (or b), whatever B is.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from clipjax.errors import ClipjaxError
from clipjax.losses.common import BatchAxes, conform


def _tiles(tree, n: int):
    """Splits the leading axis of every leaf into n tiles: [b, ...] -> [n, b/n, ...]."""
    return jax.tree.map(lambda v: v.reshape((n, v.shape[0] // n) + v.shape[1:]), tree)


def _untile(tree):
    return jax.tree.map(lambda v: v.reshape((-1,) + v.shape[2:]), tree)


def _over_tiles(step, carry, chunk_tree, n: int):
    """Runs step(carry, tile) -> (carry, out) over n tiles of a visiting chunk; outs joined."""
    if n == 1:
        return step(carry, chunk_tree)
    carry, outs = jax.lax.scan(step, carry, _tiles(chunk_tree, n))
    return carry, _untile(outs)


def _best(best, best_id, logits, other_ids, axis: int):
    """Running top-1: keeps the larger of the held best score and this block's."""
    score = logits.max(axis=axis)
    cand = other_ids[jnp.argmax(logits, axis=axis)]
    better = score > best
    return jnp.where(better, score, best), jnp.where(better, cand, best_id)


def _lse(m, s, logits, axis: int):
    """Online log-sum-exp: (running max, sum of exp(logit - max)) with one more block."""
    new = jnp.maximum(m, logits.max(axis=axis))
    s = s * jnp.exp(m - new) + jnp.exp(logits - jnp.expand_dims(new, axis)).sum(axis=axis)
    return new, s


def _stats(b: int, dtype):
    """Fresh running statistics for b rows (or columns)."""
    return {
        "max": jnp.full((b,), -jnp.inf, dtype), "sum": jnp.zeros((b,), dtype),
        "pos": jnp.zeros((b,), dtype), "count": jnp.zeros((b,), dtype),
        "best": jnp.full((b,), -jnp.inf, dtype), "best_id": jnp.zeros((b,), jnp.int32),
    }


def _forward_local(x, y, ids, s, t, *, kind: str, axes: BatchAxes, tiles: int):
    """One device's forward: returns ((loss, i2t, t2i, positives) global means, residuals)."""
    b, dtype = x.shape[0], x.dtype

    def tile_step(carry, tile):
        rows, loss = carry
        y_t, ids_t, cols = tile
        logits = s * (x @ y_t.T) + t
        pos = ids[:, None] == ids_t[None, :]
        rows, cols = dict(rows), dict(cols)
        rows["best"], rows["best_id"] = _best(rows["best"], rows["best_id"], logits, ids_t, 1)
        cols["best"], cols["best_id"] = _best(cols["best"], cols["best_id"], logits, ids, 0)
        rows["count"] = rows["count"] + pos.sum(axis=1)
        if kind == "softmax":
            rows["max"], rows["sum"] = _lse(rows["max"], rows["sum"], logits, 1)
            cols["max"], cols["sum"] = _lse(cols["max"], cols["sum"], logits, 0)
            on_pos = jnp.where(pos, logits, 0.0)
            rows["pos"] = rows["pos"] + on_pos.sum(axis=1)
            cols["pos"] = cols["pos"] + on_pos.sum(axis=0)
        else:
            loss = loss - jax.nn.log_sigmoid(jnp.where(pos, logits, -logits)).sum()
        return (rows, loss), cols

    def visit(carry, chunk):
        carry, cols = _over_tiles(tile_step, carry, chunk, tiles)
        return carry, (chunk[0], chunk[1], cols)

    def ring_step(_, state):
        carry, chunk = visit(*state)
        return carry, axes.shift(chunk)

    state = ((_stats(b, dtype), jnp.zeros((), dtype)), (y, ids, _stats(b, dtype)))
    state = jax.lax.fori_loop(0, axes.size - 1, ring_step, state)
    (rows, loss), (_, _, cols) = visit(*state)
    cols = axes.shift(cols)  # one last step brings each caption's column statistics home
    count = rows["count"]  # = each caption's count too: a pair shares its id
    if kind == "softmax":
        lse_rows = rows["max"] + jnp.log(rows["sum"])
        lse_cols = cols["max"] + jnp.log(cols["sum"])
        loss = 0.5 * ((lse_rows - rows["pos"] / count).sum()
                      + (lse_cols - cols["pos"] / count).sum())
        residuals = (lse_rows, lse_cols, count)
    else:
        residuals = ()
    i2t = (rows["best_id"] == ids).sum().astype(dtype)
    t2i = (cols["best_id"] == ids).sum().astype(dtype)
    n = b * axes.size
    outs = tuple(axes.psum(v) / n for v in (loss, i2t, t2i, count.sum()))
    return outs, residuals


def _backward_local(x, y, ids, s, t, residuals, g, *, kind: str, axes: BatchAxes, tiles: int):
    """One device's backward: recomputes each block as the chunks go round again."""
    b = x.shape[0]
    scale = g / (b * axes.size)
    if kind == "softmax":
        lse_rows, lse_cols, count = residuals
        chunk_res = (lse_cols, count)
    else:
        chunk_res = ()

    def tile_step(carry, tile):
        dx, ds, dt = carry
        y_t, ids_t, res_t, dy_t = tile
        sim = x @ y_t.T
        logits = s * sim + t
        pos = ids[:, None] == ids_t[None, :]
        if kind == "softmax":
            lse_t, count_t = res_t
            target = jnp.where(pos, 1.0 / count[:, None] + 1.0 / count_t[None, :], 0.0)
            grad = 0.5 * scale * (jnp.exp(logits - lse_rows[:, None])
                                  + jnp.exp(logits - lse_t[None, :]) - target)
        else:
            z = jnp.where(pos, 1.0, -1.0)
            grad = -scale * z * jax.nn.sigmoid(-z * logits)
        dx = dx + s * (grad @ y_t)
        dy_t = dy_t + s * (grad.T @ x)
        return (dx, ds + (grad * sim).sum(), dt + grad.sum()), dy_t

    def visit(carry, chunk):
        carry, dy = _over_tiles(tile_step, carry, chunk, tiles)
        return carry, chunk[:3] + (dy,)

    def ring_step(_, state):
        carry, chunk = visit(*state)
        return carry, axes.shift(chunk)

    zero = jnp.zeros((), x.dtype)
    state = ((jnp.zeros_like(x), zero, zero), (y, ids, chunk_res, jnp.zeros_like(y)))
    state = jax.lax.fori_loop(0, axes.size - 1, ring_step, state)
    (dx, ds, dt), (_, _, _, dy) = visit(*state)
    dy = axes.shift(dy)  # each caption's gradient rides home with one last step
    return dx, dy, axes.psum(ds), axes.psum(dt)


def ring_loss(x, y, ids, s, t, *, kind: str, mesh, axes: BatchAxes, chunk: int = 0):
    """(loss, i2t_acc, t2i_acc, mean positives per sample) for global x, y [B, d].

    Differentiable in x, y, s (the exponentiated scale) and t (the bias) through a
    custom VJP; the accuracies and positives are piecewise constant (zero gradient).
    """
    b = x.shape[0] // axes.size
    tiles = 1
    if 0 < chunk < b:
        if b % chunk:
            raise ClipjaxError(
                f"loss.chunk={chunk} must divide the per-device batch {b} "
                f"(global {x.shape[0]} over {axes.size} devices)")
        tiles = b // chunk
    static = {"kind": kind, "axes": axes, "tiles": tiles}
    fwd = functools.partial(_forward_local, **static)
    bwd = functools.partial(_backward_local, **static)
    if mesh is not None:
        row, vec = P(axes.name, None), P(axes.name)
        x, y, ids, s, t = conform(mesh, (x, y, ids, s, t), (row, row, vec, P(), P()))
        res = (vec, vec, vec) if kind == "softmax" else ()
        fwd = jax.shard_map(fwd, mesh=mesh, in_specs=(row, row, vec, P(), P()),
                            out_specs=((P(),) * 4, res), check_vma=False)
        bwd = jax.shard_map(bwd, mesh=mesh, in_specs=(row, row, vec, P(), P(), res, P()),
                            out_specs=(row, row, P(), P()), check_vma=False)

    @jax.custom_vjp
    def core(x, y, ids, s, t):
        return fwd(x, y, ids, s, t)[0]

    def core_fwd(x, y, ids, s, t):
        outs, residuals = fwd(x, y, ids, s, t)
        return outs, (x, y, ids, s, t, residuals)

    def core_bwd(saved, cotangents):
        x, y, ids, s, t, residuals = saved
        dx, dy, ds, dt = bwd(x, y, ids, s, t, residuals, cotangents[0])
        return dx, dy, None, ds, dt

    core.defvjp(core_fwd, core_bwd)
    return core(x, y, ids, s, t)
