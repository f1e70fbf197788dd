"""A config and a mesh → the sharded train program: state layout, init, jitted step.

This is what `clipjax train` runs and what `clipjax compile` lowers for a TPU
topology: nothing here touches data, files or the clock.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from ml_collections import ConfigDict

from clipjax import models, optim, sharding
from clipjax.errors import ConfigError
from clipjax.train import state as state_lib
from clipjax.train import step as step_lib
from clipjax.train.state import TrainState

jax.config.update("jax_threefry_partitionable", True)  # sharded init = unsharded init


@dataclasses.dataclass
class TrainProgram:
    config: ConfigDict
    mesh: Mesh
    rules: sharding.Rules
    batch_axes: tuple[str, ...]
    model: nn.Module
    tx: optax.GradientTransformation
    lr: optax.Schedule
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
    state_shardings: TrainState
    batch_shardings: dict[str, NamedSharding]
    _init: Any = None
    _step: Any = None
    _norm: Any = None

    @contextlib.contextmanager
    def context(self):
        """The mesh and logical-axis rules the model's sharding constraints resolve against."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def init(self, seed: int | None = None) -> TrainState:
        """A fresh state, each shard computed where it lives."""
        seed = int(self.config.train.seed if seed is None else seed)
        return self._init(jax.random.key(seed))

    def step(self, state: TrainState, batch: dict[str, jax.Array]):
        """One jitted step: (state, global batch) → (state, metrics). `state` is donated."""
        with self.context():
            return self._step(state, batch)

    def param_norm(self, params) -> jax.Array:
        """Global L2 norm of the params (computed at log steps, outside the step)."""
        if self._norm is None:
            self._norm = jax.jit(optax.tree.norm, out_shardings=sharding.replicated(self.mesh))
        return self._norm(params)

    def lower(self, state=None, batch=None):
        """The step lowered for abstract (or given) inputs: for AOT compile and cost analysis."""
        with self.context():
            return self._step.lower(state or self.abstract_state, batch or self.abstract_batch())

    def frozen_towers(self) -> tuple[str, ...]:
        """Top-level param groups ('image', 'text') that `optim.frozen` locks entirely."""
        mask = optim.trainable_mask(self.abstract_state.params, self.config.optim.frozen)
        return tuple(k for k, v in mask.items()
                     if isinstance(v, dict) and not any(jax.tree.leaves(v)))

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        b = self.config.data.batch_size
        return {k: jax.ShapeDtypeStruct((b, *tail), dtype, sharding=self.batch_shardings[k])
                for k, (tail, dtype) in batch_layout(self.config).items()}

    def global_batch(self, local: dict[str, Any]) -> dict[str, jax.Array]:
        """This process's numpy batch → global arrays split over the batch axes."""
        missing = [k for k in self.batch_shardings if k not in local]
        if missing:
            raise ConfigError(
                "data.train", f"the input batches lack {missing}, which this config's "
                "loss.positives / model.image.patch_dropout need")
        return sharding.to_global({k: local[k] for k in self.batch_shardings}, self.mesh,
                                  self.batch_axes)


def batch_layout(config: ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
    """name -> (per-sample shape, dtype) of what a step reads from each batch: uint8 pixels
    (the step normalises), token rows, and, when the config needs them, class labels
    (`loss.positives='label'`) and the kept patch indices (`model.image.patch_dropout`)."""
    from clipjax.config import kept_patches

    m = config.model
    size, length = m.image.image_size, m.text.context_length
    out = {"image": ((size, size, 3), jnp.uint8), "text": ((length,), jnp.int32)}
    if config.loss.positives == "label":
        out["label"] = ((), jnp.int32)
    if m.image.kind == "vit" and float(m.image.get("patch_dropout", 0.0)):
        patches = (size // m.image.patch_size) ** 2
        out["patches"] = ((kept_patches(patches, m.image.patch_dropout),), jnp.int32)
    return out


def _check_batch(config: ConfigDict, mesh: Mesh, axes: tuple[str, ...]) -> None:
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    micro = config.data.batch_size // config.train.grad_accum
    if config.data.batch_size % n:
        raise ConfigError("data.batch_size",
                          f"{config.data.batch_size} does not split over the {n} devices of the "
                          f"batch axes {axes}")
    if micro % n:
        raise ConfigError("train.grad_accum",
                          f"micro-batches of {micro} do not split over the {n} devices of the "
                          f"batch axes {axes}")


def build(config: ConfigDict, mesh: Mesh | None = None) -> TrainProgram:
    """Everything compiled for `config` on `mesh` (default: all devices, `config.mesh`)."""
    mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    rules = sharding.rules(config)
    axes = tuple(a for a in sharding.batch_axes(config) if a in mesh.shape)
    _check_batch(config, mesh, axes)
    # Under accumulation the full scan needs less memory (see Transformer.scan_pooled_last).
    model = models.build_model(config.model, int(config.train.grad_accum) <= 1)
    tx = optim.build(config)
    lr = optim.schedule(config.optim, int(config.train.steps))
    ema_decay = float(config.train.get("ema_decay", 0.0))
    abstract, shardings = state_lib.state_shardings(config.model, tx, mesh, rules,
                                                    ema=ema_decay > 0)
    optim.check_frozen(abstract.params, config.optim.frozen)
    trainable = optim.trainable_mask(abstract.params, config.optim.frozen)
    batch_shardings = {k: sharding.batch_sharding(mesh, axes, 1 + len(tail))
                       for k, (tail, _) in batch_layout(config).items()}
    spec = step_lib.StepSpec(model=model, tx=tx, lr=lr, loss_cfg=config.loss, mesh=mesh,
                             batch_axes=axes, trainable=trainable,
                             grad_accum=int(config.train.grad_accum),
                             image_mean=tuple(config.model.image.mean),
                             image_std=tuple(config.model.image.std), ema_decay=ema_decay,
                             freeze_after_nonfinite=config.train.nonfinite == "stop")
    program = TrainProgram(
        config=config, mesh=mesh, rules=rules, batch_axes=axes, model=model, tx=tx, lr=lr,
        abstract_state=abstract, state_shardings=shardings, batch_shardings=batch_shardings)
    program._init = state_lib.make_init(model, config.model, tx, shardings, mesh, rules)
    program._step = step_lib.make_step(spec, shardings, batch_shardings)
    return program
