"""Meshes from config, logical-axis rules, and host-local → global batches."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from clipjax import config as config_lib
from clipjax import models, sharding
from clipjax.errors import ConfigError


def _cfg(data=-1, fsdp=1, model=1):
    c = config_lib.default_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.model = data, fsdp, model
    return c


def test_minus_one_takes_the_rest():
    assert sharding.mesh_shape(_cfg().mesh, 8) == {"data": 8, "fsdp": 1, "model": 1,
                                                   "slices": 1}
    assert sharding.mesh_shape(_cfg(2, -1, 2).mesh, 8) == {"data": 2, "fsdp": 2, "model": 2,
                                                           "slices": 1}
    c = _cfg()
    c.mesh.slices = 2
    assert sharding.mesh_shape(c.mesh, 8) == {"data": 4, "fsdp": 1, "model": 1, "slices": 2}
    with pytest.raises(ConfigError, match="mesh"):
        sharding.mesh_shape(_cfg(3, 1, 1).mesh, 8)
    with pytest.raises(ConfigError, match="mesh"):
        sharding.mesh_shape(_cfg(-1, 3, 1).mesh, 8)


def test_mesh_has_auto_axes_in_config_order():
    mesh = sharding.make_mesh(_cfg(2, 2, 2).mesh)
    assert mesh.axis_names == ("data", "fsdp", "model")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}
    assert set(mesh.axis_types) == {AxisType.Auto}


def test_batch_axes_follow_the_batch_rule():
    c = _cfg()
    assert sharding.batch_axes(c) == ("data", "fsdp")
    c.sharding_rules = (("batch", "data"), ("embed", None))
    assert sharding.batch_axes(c) == ("data",)


def test_fit_spec_replicates_dims_the_axes_do_not_divide():
    mesh = sharding.make_mesh(_cfg(2, 4, 1).mesh)
    assert sharding.fit_spec(P("fsdp", "data"), (8, 3), mesh) == P("fsdp", None)
    assert sharding.fit_spec(P(("data", "fsdp")), (16,), mesh) == P(("data", "fsdp"))
    assert sharding.fit_spec(P(("data", "fsdp")), (4,), mesh) == P(None)


def test_model_params_get_their_logical_shardings():
    c = _cfg(2, 2, 2)
    c.model.embed_dim, c.model.image.image_size, c.model.image.width = 32, 32, 64
    c.model.image.layers = c.model.text.layers = 1
    c.model.image.heads = c.model.text.heads = 2
    c.model.text.width, c.model.text.context_length = 64, 16
    mesh = sharding.make_mesh(c.mesh)
    shardings = sharding.logical_shardings(
        models.abstract_params(c.model), mesh, sharding.rules(c))
    specs = sharding.describe(shardings)
    assert specs["text/token_embedding"] == str(P("model", "fsdp"))  # ('vocab', 'embed')
    assert specs["image/transformer/blocks_0/mlp/fc_kernel"] == str(P("fsdp", "model"))
    assert specs["logit_scale"] == str(P())


def test_to_global_assembles_the_batch_over_the_batch_axes():
    mesh = sharding.make_mesh(_cfg(2, 4, 1).mesh)
    local = {"image": np.arange(16 * 2 * 2 * 3, dtype=np.float32).reshape(16, 2, 2, 3),
             "text": np.arange(16 * 5, dtype=np.int32).reshape(16, 5)}
    out = sharding.to_global(local, mesh, ("data", "fsdp"))
    assert out["text"].shape == (16, 5)
    assert out["text"].sharding.spec == P(("data", "fsdp"), None)
    assert {s.data.shape for s in out["image"].addressable_shards} == {(2, 2, 2, 3)}
    np.testing.assert_array_equal(jax.device_get(out["text"]), local["text"])


def _odd_width_config(strict=False):
    c = config_lib.load("configs/tiny.py", [])
    c.mesh.data, c.mesh.fsdp = 1, 8
    c.model.image.width = 68  # 68 % 8 != 0: the image tower's `embed` dims cannot split
    c.sharding.strict = strict
    return config_lib.validate(c)


def test_fit_spec_warns_once_per_param_naming_dim_and_axis(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    monkeypatch.setattr(sharding, "_WARNED", set())
    mesh = sharding.make_mesh(_cfg(2, 4, 1).mesh)
    with pytest.warns(sharding.ShardingWarning) as record:
        assert sharding.fit_spec(P("fsdp", "data"), (8, 3), mesh, "a/kernel") == P("fsdp", None)
        sharding.fit_spec(P("fsdp", "data"), (8, 3), mesh, "a/kernel")  # said already
    assert len(record) == 1
    message = str(record[0].message)
    assert "a/kernel" in message and "dimension 1 (size 3)" in message
    assert "mesh axis data (size 2)" in message
    c = _odd_width_config()
    with pytest.warns(sharding.ShardingWarning) as record:
        specs = sharding.describe(sharding.logical_shardings(
            models.abstract_params(c.model), sharding.make_mesh(c.mesh), sharding.rules(c)))
    messages = [str(r.message) for r in record]
    assert specs["image/class_embedding"] == str(P(None))
    assert any("image/class_embedding" in m and "mesh axis fsdp (size 8)" in m
               for m in messages)
    assert not any(m.startswith("param text/") for m in messages)  # width 64 splits
    assert len(messages) == len(set(messages))


def test_strict_sharding_is_an_error_before_compile(repo_root, monkeypatch):
    from clipjax.train import program as program_lib

    monkeypatch.chdir(repo_root)
    c = _odd_width_config(strict=True)
    with pytest.raises(ConfigError, match=r"sharding.strict: param image/.* fsdp") as e:
        program_lib.build(c, sharding.make_mesh(c.mesh))
    assert e.value.key == "sharding.strict"
