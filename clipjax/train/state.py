"""The train state and its shardings: created sharded, never whole on one host.

Shapes come from `jax.eval_shape`; param shardings from the logical axis
names the models put on every param (through `config.sharding_rules`);
optimizer-state leaves that mirror a param take that param's sharding, the
rest (counts, factored Adafactor moments) are replicated. `init` is then
`jax.jit(..., out_shardings=...)`, so each device computes only its shard.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from clipjax import models, sharding


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes. `step` counts batches consumed (data position);
    `nonfinite` counts steps whose update was skipped for a non-finite loss or gradient;
    `ema` (None when `train.ema_decay` is 0) is the exponential moving average of the
    params, sharded like them and saved as the checkpoint's "ema" item."""

    step: jax.Array
    params: Any
    opt_state: Any
    nonfinite: jax.Array
    ema: Any = None

    def train_item(self) -> dict[str, Any]:
        """What the checkpoint's "train" item holds (params are their own item)."""
        return {"step": self.step, "opt_state": self.opt_state, "nonfinite": self.nonfinite}

    def replace_from(self, params: Any, train_item: dict[str, Any], ema: Any = None) -> TrainState:
        return TrainState(step=train_item["step"], params=params,
                          opt_state=train_item["opt_state"], nonfinite=train_item["nonfinite"],
                          ema=ema)


def param_shardings(model_cfg, mesh: Mesh, rules: sharding.Rules) -> tuple[Any, Any]:
    """(abstract unboxed params, their NamedShardings) from the model's logical axis names."""
    boxed = models.abstract_params(model_cfg)
    return nn.meta.unbox(boxed), sharding.logical_shardings(boxed, mesh, rules)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any,
                        params_sharding: Any, mesh: Mesh) -> tuple[Any, Any]:
    """(abstract optimizer state, shardings): a param's sharding for leaves shaped like it."""
    abstract = jax.eval_shape(tx.init, abstract_params)
    rep = sharding.replicated(mesh)

    def pick(leaf, param, param_sharding):
        if isinstance(leaf, optax.MaskedNode):  # a frozen param: no state, nothing to place
            return leaf
        if getattr(leaf, "shape", None) == param.shape:
            return param_sharding
        return rep

    shardings = optax.tree_map_params(
        tx, pick, abstract, abstract_params, params_sharding,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    return abstract, shardings


def state_shardings(model_cfg, tx, mesh: Mesh, rules: sharding.Rules,
                    ema: bool = False) -> tuple[Any, Any]:
    """(abstract TrainState with shardings attached, TrainState of NamedShardings);
    `ema`: the state holds an EMA of the params (laid out like them)."""
    abs_params, p_shard = param_shardings(model_cfg, mesh, rules)
    abs_opt, o_shard = opt_state_shardings(tx, abs_params, p_shard, mesh)
    rep = sharding.replicated(mesh)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract = TrainState(step=scalar, params=abs_params, opt_state=abs_opt, nonfinite=scalar,
                          ema=abs_params if ema else None)
    shardings = TrainState(step=rep, params=p_shard, opt_state=o_shard, nonfinite=rep,
                           ema=p_shard if ema else None)
    with_sharding = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return with_sharding, shardings


def make_init(model, model_cfg, tx, shardings: TrainState, mesh: Mesh, rules):
    """A jitted `init(rng) -> TrainState` whose outputs are born with `shardings`."""

    def init(rng):
        boxed = model.init(rng, *models.dummy_inputs(model_cfg))["params"]
        params = nn.meta.unbox(boxed)
        zero = jnp.zeros((), jnp.int32)
        ema = copy_tree(params) if shardings.ema is not None else None
        return TrainState(step=zero, params=params, opt_state=tx.init(params), nonfinite=zero,
                          ema=ema)

    jitted = jax.jit(init, out_shardings=shardings)

    def run(rng) -> TrainState:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(rng)

    return run


def copy_tree(tree: Any) -> Any:
    """Fresh buffers with the same values (an EMA born equal to the params must not share
    their buffers: the step donates both)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def update_ema(decay: float, ema: Any, params: Any) -> Any:
    """ema <- decay * ema + (1 - decay) * params, leaf by leaf, in the params' dtype."""
    d = jnp.float32(decay)
    return jax.tree.map(
        lambda e, p: (d * e.astype(jnp.float32) + (1 - d) * p.astype(jnp.float32)).astype(e.dtype),
        ema, params)


def shardings_of(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)


def is_named(s) -> bool:
    return isinstance(s, NamedSharding)
