"""Converting params between the unrolled and the scanned transformer layouts.

Unrolled (`model.scan_layers=False`): `transformer/blocks_0/...`, `blocks_1/...`.
Scanned (`True`): `transformer/blocks/...`, each leaf with a leading layers axis.
The same weights give the same outputs in either layout; importers write the
unrolled one and stack it when the config asks for scan.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_BLOCK = re.compile(r"^blocks_(\d+)$")


def _stack(leaves):
    if all(isinstance(x, np.ndarray) for x in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def stack_layers(params: Any) -> Any:
    """Unrolled -> scanned: every `blocks_0..N-1` group becomes one stacked `blocks`."""
    if not hasattr(params, "items"):
        return params
    indices = sorted(int(m.group(1)) for k in params if (m := _BLOCK.match(k)))
    out = {k: stack_layers(v) for k, v in params.items() if not _BLOCK.match(k)}
    if indices:
        if indices != list(range(len(indices))):
            raise ValueError(f"non-contiguous transformer blocks {indices}")
        blocks = [params[f"blocks_{i}"] for i in indices]
        out["blocks"] = jax.tree.map(lambda *xs: _stack(xs), *blocks)
    return out


def unstack_layers(params: Any) -> Any:
    """Scanned -> unrolled: a stacked `blocks` becomes `blocks_0..N-1`."""
    if not hasattr(params, "items"):
        return params
    out = {}
    for k, v in params.items():
        if k == "blocks":
            n = jax.tree.leaves(v)[0].shape[0]
            for i in range(n):
                out[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], v)
        else:
            out[k] = unstack_layers(v)
    return out


def is_scanned(params: Any) -> bool:
    """Whether any transformer in `params` uses the stacked `blocks` layout."""
    if not hasattr(params, "items"):
        return False
    return any(k == "blocks" or is_scanned(v) for k, v in params.items())
