"""Tensor parallelism that stays sharded: the train step compiled on the 8-device CPU
mesh with `mesh.model=2` gathers no weight over the model axis (read from the compiled
HLO), on both kernel paths, and each device holds about half the params of `model=1`."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipjax import config as config_lib
from clipjax import hlo, sharding
from clipjax.train import program as program_lib


def _config(model: int, kernels: str = "auto"):
    c = config_lib.load("configs/tiny.py", [])
    c.mesh.data, c.mesh.fsdp, c.mesh.model = -1, 1, model
    c.model.text.vocab_size = 1000  # small, still split over the model axis
    c.model.kernels = kernels
    return config_lib.validate(c)


@pytest.fixture(autouse=True)
def _in_repo(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)


def _param_bytes_per_device(program) -> int:
    total = 0
    for leaf in jax.tree.leaves(program.abstract_state.params):
        total += math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    return total


@pytest.mark.parametrize("kernels", ["cpu", "xla"])
def test_model_axis_gathers_no_weights(kernels):
    c = _config(2, kernels)
    mesh = sharding.make_mesh(c.mesh)
    program = program_lib.build(c, mesh)
    found = hlo.collectives(program.lower().compile().as_text())
    over_model = hlo.crossing(found, hlo.axis_coordinates(mesh, "model"))
    gathers = [x for x in over_model if x.kind in ("all-gather", "all-to-all")]
    assert not gathers, [(x.kind, x.shape) for x in gathers]
    # Tensor parallelism is on: partial sums of the split matmuls are all-reduced.
    assert any(x.kind == "all-reduce" for x in over_model)
    # The data axis still gathers the embeddings for the loss (dense).
    over_data = hlo.crossing(found, hlo.axis_coordinates(mesh, "data"))
    assert any(x.kind == "all-gather" for x in over_data)


def test_model_two_halves_the_params_per_device():
    one = program_lib.build(_config(1), sharding.make_mesh(_config(1).mesh))
    two = program_lib.build(_config(2), sharding.make_mesh(_config(2).mesh))
    qkv = two.abstract_state.params["image"]["transformer"]["blocks_0"]["attn"]["qkv_kernel"]
    assert qkv.sharding.shard_shape(qkv.shape) == (64, 3, 1, 32)  # heads split 2-way
    ratio = _param_bytes_per_device(two) / _param_bytes_per_device(one)
    # Norms, biases over `embed` and the patch kernel stay whole: a little over half.
    assert 0.5 <= ratio < 0.56, ratio


def test_hlo_collectives_and_replica_groups():
    text = "\n".join([
        "  %all-gather.1 = f32[16,32]{1,0} all-gather(f32[4,32]{1,0} %p), channel_id=1, "
        "replica_groups={{0,2,4,6},{1,3,5,7}}, dimensions={0}, use_global_device_ids=true",
        "  %ar = (f32[80]{0}, bf16[2,3]{1,0}) all-reduce-start(f32[80]{0} %a, bf16[2,3] %b), "
        "channel_id=2, replica_groups=[4,2]<=[8], to_apply=%add",
        "  %all-reduce-done = f32[80]{0} all-reduce-done(%ar)",
        "  ROOT %cp = f32[8]{0} collective-permute(f32[8]{0} %x), channel_id=3, "
        "source_target_pairs={{0,4},{4,0}}",
        "  %rs = f32[2]{0} reduce-scatter(f32[8]{0} %y), replica_groups=[2,4]<=[4,2]T(1,0), "
        "dimensions={0}",
        "  %everyone = f32[] all-reduce(f32[] %z), replica_groups={}, to_apply=%add",
    ])
    found = hlo.collectives(text)
    assert [c.kind for c in found] == ["all-gather", "all-reduce", "collective-permute",
                                       "reduce-scatter", "all-reduce"]
    gather, ar, cp, rs, everyone = found
    assert gather.groups == ((0, 2, 4, 6), (1, 3, 5, 7)) and gather.bytes == 16 * 32 * 4
    assert ar.groups == ((0, 1), (2, 3), (4, 5), (6, 7)) and ar.bytes == 80 * 4 + 6 * 2
    assert cp.groups == ((0, 4), (4, 0))
    assert rs.groups == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert everyone.all_devices
    # Mesh (data=4, model=2): partition p sits at data p // 2, model p % 2.
    model = np.arange(8) % 2
    halves = np.arange(8) // 4  # two pseudo-slices of four
    assert [c.spans(model) for c in found] == [False, True, False, False, True]
    assert [c.spans(halves) for c in found] == [True, False, True, True, True]
    assert hlo.summarize(found)["all-reduce"]["count"] == 2
