"""Multi-slice on the emulated CPU mesh: `mesh.slices=2` splits the 8 devices into two
pseudo-slices of 4 (a leading `slices` mesh axis); the batch goes over it, params and
optimizer state are replicated across slices and sharded within one, and training gives
the losses and params of one device."""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
import pytest

from clipjax import config as config_lib
from clipjax import hlo, sharding
from clipjax.data.pipeline import build_train_pipeline
from clipjax.train import program as program_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2


def _config(*overrides: str):
    return config_lib.load(os.path.join(REPO, "configs", "tiny.py"), [
        "--config.data.batch_size=32", "--config.model.image.layers=1",
        "--config.model.text.layers=1", *overrides])


@functools.cache
def _batches():
    it = build_train_pipeline(_config())
    return [next(it) for _ in range(STEPS)]


def _train(config, devices):
    program = program_lib.build(config, sharding.make_mesh(config.mesh, devices))
    state = program.init()
    losses = []
    for local in _batches():
        batch = {k: jax.device_put(v, program.batch_shardings[k]) for k, v in local.items()}
        state, metrics = program.step(state, batch)
        losses.append(float(metrics["loss"]))
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state.params)
    return program, losses, params


@functools.cache
def _one_device():
    return _train(_config(), jax.devices()[:1])[1:]


@pytest.mark.parametrize("overrides", [
    ("--config.mesh.fsdp=2",),  # 2 slices x (data 2, fsdp 2), dense loss
    ("--config.loss.impl=ring", "--config.train.grad_accum=2"),  # 2 x (data 4), ring, GradCache
])
def test_two_pseudo_slices_train_like_one_device(overrides):
    config = _config("--config.mesh.slices=2", *overrides)
    program, losses, params = _train(config, jax.devices())
    mesh = program.mesh
    assert mesh.axis_names[0] == "slices" and mesh.shape["slices"] == 2
    assert program.batch_axes == ("slices", "data", "fsdp")
    # Params: never split over slices (replicated across them), split within one by fsdp.
    specs = sharding.describe(program.state_shardings.params)
    assert not any("slices" in s for s in specs.values())
    if mesh.shape["fsdp"] > 1:
        assert specs["text/token_embedding"] == str(jax.sharding.PartitionSpec("model", "fsdp"))
        # The gradient reduction crosses the pseudo-slice boundary (one case: a compile).
        found = hlo.collectives(program.lower().compile().as_text())
        across = hlo.crossing(found, hlo.slice_coordinates(mesh))
        assert any(c.kind in ("all-reduce", "reduce-scatter") for c in across)

    ref_losses, ref_params = _one_device()
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                            jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=2e-5, err_msg=jax.tree_util.keystr(path))


def test_slices_must_carry_the_batch():
    c = _config("--config.mesh.slices=2")
    c.sharding_rules = tuple(("batch", ("data", "fsdp")) if name == "batch" else (name, t)
                             for name, t in c.sharding_rules)
    with pytest.raises(config_lib.ConfigError, match="'batch' rule"):
        config_lib.validate(c)
    with pytest.raises(config_lib.ConfigError, match="mesh.slices"):
        _config("--config.mesh.slices=0")


def test_one_slice_keeps_the_mesh_and_rules_unchanged():
    c = _config()
    mesh = sharding.make_mesh(c.mesh)
    assert mesh.axis_names == ("data", "fsdp", "model")
    assert sharding.batch_axes(c) == ("data", "fsdp")
    assert dict(sharding.rules(c))["batch"] == ("data", "fsdp")
    c2 = _config("--config.mesh.slices=2")
    assert dict(sharding.rules(c2))["batch"] == ("slices", "data", "fsdp")
    assert sharding.make_mesh(c2.mesh).devices.shape == (2, 4, 1, 1)
