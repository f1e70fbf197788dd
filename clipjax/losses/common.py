"""What the dense and the ring losses share: the batch axes as one object, and caption hashes.

Both implementations are written as per-device functions over a local batch
slice; `BatchAxes` gives them the collectives, and turns into no-ops on one
device (mesh=None), so the same code path runs everywhere.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType


@dataclasses.dataclass(frozen=True)
class BatchAxes:
    """The mesh axes the batch is sharded over, seen from inside `shard_map` (name=None: one
    device, every collective is the identity)."""

    name: tuple[str, ...] | None
    size: int

    def psum(self, x):
        return x if self.name is None else jax.lax.psum(x, self.name)

    def all_gather(self, x):
        return x if self.name is None else jax.lax.all_gather(x, self.name, tiled=True)

    def shift(self, tree):
        """Sends every leaf one step along the ring (device i -> i+1)."""
        if self.name is None or self.size == 1:
            return tree
        perm = [(i, (i + 1) % self.size) for i in range(self.size)]
        return jax.tree.map(lambda x: jax.lax.ppermute(x, self.name, perm), tree)


def conform(mesh, args, specs):
    """Reshards args to specs where the mesh has Explicit axes (shard_map then needs the exact
    input sharding); on Auto meshes shard_map reshards by itself."""
    if all(t != AxisType.Explicit for t in mesh.axis_types):
        return args
    return tuple(jax.sharding.reshard(a, s) for a, s in zip(args, specs, strict=True))


def axes_of(mesh, batch_axes) -> BatchAxes:
    if mesh is None:
        return BatchAxes(None, 1)
    names = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    return BatchAxes(names, math.prod(mesh.shape[a] for a in names))


# --------------------------------------------------------------------------- caption ids

_C1, _C2, _MIX = 0xCC9E2D51, 0x1B873593, 0xE6546B64


def _rotl(x, r):
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _fmix(h):
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def caption_ids(tokens) -> jax.Array:
    """A 32-bit MurmurHash3 of each row's token ids: int32 [B] from int [B, L].

    Equal rows give equal ids; different rows collide with probability 2**-32 per
    pair (a few false positives in a batch of a million: harmless for the loss).
    Jit-friendly: a scan over the L token positions.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        from clipjax.errors import ClipjaxError

        raise ClipjaxError(f"caption_ids expects tokens [B, L]; got shape {tokens.shape}")
    words = jax.lax.bitcast_convert_type(tokens.astype(jnp.int32), jnp.uint32)

    def step(h, k):
        k = _rotl(k * np.uint32(_C1), 15) * np.uint32(_C2)
        h = _rotl(h ^ k, 13) * np.uint32(5) + np.uint32(_MIX)
        return h, None

    h0 = jnp.full(tokens.shape[:1], 0x9747B28C, jnp.uint32)
    h, _ = jax.lax.scan(step, h0, words.T)
    h = _fmix(h ^ np.uint32(tokens.shape[1] * 4))
    return jax.lax.bitcast_convert_type(h, jnp.int32)
