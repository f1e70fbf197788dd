"""The optimizer a config describes: schedules, weight-decay mask, clipping, freezing."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clipjax import config as config_lib
from clipjax import models, optim
from clipjax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(*overrides):
    return config_lib.load(os.path.join(REPO, "configs", "tiny.py"), list(overrides))


@pytest.fixture(scope="module")
def params():
    """The tiny model's real param tree (shapes only: no compile needed)."""
    import flax.linen as nn

    abstract = nn.meta.unbox(models.abstract_params(tiny().model))
    return jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), abstract)


def test_warmup_then_cosine_linear_constant():
    c = tiny("--config.optim.lr=1.0", "--config.optim.warmup_steps=10",
             "--config.optim.end_lr=0.1", "--config.train.steps=110")
    cos = optim.schedule(c.optim, 110)
    assert float(cos(0)) == 0.0
    assert float(cos(5)) == pytest.approx(0.5)
    assert float(cos(10)) == pytest.approx(1.0)
    assert float(cos(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # half-way down
    assert float(cos(110)) == pytest.approx(0.1, rel=1e-5)
    c.optim.schedule = "linear"
    lin = optim.schedule(c.optim, 110)
    assert float(lin(60)) == pytest.approx(0.55, rel=1e-5)
    c.optim.schedule = "constant"
    assert float(optim.schedule(c.optim, 110)(100)) == pytest.approx(1.0)


def test_weight_decay_only_on_matrices_that_are_not_embeddings(params):
    mask = optim.decay_mask(params, tiny().optim.no_decay)
    flat = {optim.path_str(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = {k for k, m in flat.items() if m}
    assert "image/transformer/blocks_0/mlp/fc_kernel" in decayed
    assert "image/transformer/blocks_0/attn/qkv_kernel" in decayed
    assert "text/text_projection" in decayed and "image/patch_kernel" in decayed
    for name in ("text/token_embedding", "text/positional_embedding", "image/class_embedding",
                 "image/positional_embedding", "logit_scale", "image/ln_pre/scale",
                 "image/transformer/blocks_0/attn/qkv_bias",  # a 3-d bias
                 "image/transformer/blocks_0/mlp/fc_bias"):
        assert not flat[name], name


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "sgd"])
def test_each_optimizer_descends_and_decays_only_masked(name, params):
    c = tiny(f"--config.optim.name={name}", "--config.optim.warmup_steps=0",
             "--config.optim.schedule=constant", "--config.optim.lr=0.01",
             "--config.optim.weight_decay=0.5", "--config.optim.clip_norm=0.0")
    tx = optim.build(c)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, state, params)  # zero gradient: only weight decay acts
    kernel = updates["image"]["transformer"]["blocks_0"]["mlp"]["fc_kernel"]
    assert float(jnp.max(kernel)) < 0  # decayed towards zero
    for leaf in ("logit_scale",):
        assert float(jnp.abs(updates[leaf]).max()) == 0.0
    assert float(jnp.abs(updates["text"]["token_embedding"]).max()) == 0.0
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    assert float(updates["text"]["ln_final"]["bias"].max()) < 0  # moves against the gradient


def test_clip_by_global_norm():
    c = tiny("--config.optim.name=sgd", "--config.optim.b1=0.0", "--config.optim.lr=1.0",
             "--config.optim.weight_decay=0.0", "--config.optim.warmup_steps=0",
             "--config.optim.schedule=constant", "--config.optim.clip_norm=1.0")
    p = {"w": jnp.zeros((4,))}
    tx = optim.build(c)
    updates, _ = tx.update({"w": jnp.full((4,), 10.0)}, tx.init(p), p)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)


def test_frozen_params_get_no_state_and_no_update(params):
    c = tiny("--config.optim.frozen=image/.*", "--config.optim.warmup_steps=0",
             "--config.optim.schedule=constant")
    tx = optim.build(c)
    state = tx.init(params)
    n_text = len(jax.tree.leaves(params["text"])) + 1  # + logit_scale
    moments = [x for x in jax.tree.leaves(state) if x.ndim > 0 or x.dtype != jnp.int32]
    assert len(moments) == 2 * n_text  # Adam's mu and nu for trainable params only
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates["image"]))
    assert float(jnp.abs(updates["text"]["text_projection"]).max()) > 0
    labels = optim.frozen_labels(params, "image/.*")
    assert set(jax.tree.leaves(labels["image"])) == {optim.FROZEN}


def test_frozen_regex_that_matches_nothing_is_a_config_error(params):
    with pytest.raises(ConfigError, match="optim.frozen"):
        optim.check_frozen(params, "imgae/.*")
    with pytest.raises(ConfigError, match="optim.frozen"):
        optim.check_frozen(params, ".*")


def test_adamw_matches_torch_adamw_defaults():
    """β2 = 0.98, eps 1e-6 (CLIP) and decoupled decay scaled by lr, as torch.optim.AdamW."""
    c = tiny("--config.optim.warmup_steps=0", "--config.optim.schedule=constant",
             "--config.optim.clip_norm=0.0", "--config.optim.lr=0.1")
    assert (c.optim.b1, c.optim.b2, c.optim.eps) == (0.9, 0.98, 1e-6)
    p = {"w": jnp.array([[1.0, -2.0]])}
    tx = optim.build(c)
    g = {"w": jnp.array([[0.5, 0.25]])}
    updates, _ = tx.update(g, tx.init(p), p)
    # Step 1: m̂ = g, v̂ = g², so the Adam step is lr·g/(|g|+eps) plus lr·wd·w.
    want = -0.1 * (np.array([[0.5, 0.25]]) / (np.array([[0.5, 0.25]]) + 1e-6)
                   + 0.2 * np.array([[1.0, -2.0]]))
    np.testing.assert_allclose(updates["w"], want, rtol=1e-5)
    assert not math.isnan(float(updates["w"].sum()))
