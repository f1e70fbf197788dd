"""The sharded train step on the emulated 8-device mesh: one program, any mesh shape.

Every run here is the tiny config (real models, losses, optimizer, synthetic
pipeline) for a few steps; results are cached per (mesh, grad_accum) so each
program compiles once for the whole module.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import math
import os
import shutil

import jax
import numpy as np
import pytest

from clipjax import checkpoint, sharding
from clipjax import config as config_lib
from clipjax.data.pipeline import build_train_pipeline
from clipjax.errors import ClipjaxError
from clipjax.train import loop
from clipjax.train import program as program_lib
from clipjax.train.checkpointing import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
BATCH = 32  # 4 micro-batches of 8 split over the 8 batch devices of the (2, 4, 1) mesh


def tiny(*overrides: str):
    """configs/tiny.py with one block per tower (compiles twice as fast; nothing here depends
    on depth)."""
    return config_lib.load(os.path.join(REPO, "configs", "tiny.py"),
                           [f"--config.data.batch_size={BATCH}", "--config.model.image.layers=1",
                            "--config.model.text.layers=1", *overrides])


def _mesh(config, shape):
    config.mesh.data, config.mesh.fsdp, config.mesh.model = shape
    return sharding.make_mesh(config.mesh, jax.devices()[: math.prod(shape)])


@functools.cache
def batches():
    it = build_train_pipeline(tiny())
    return [next(it) for _ in range(STEPS)]


def _numpy(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


@functools.cache
def run(shape=(1, 1, 1), grad_accum=1, workdir=None):
    """Losses and final params of STEPS steps; with `workdir`, a checkpoint after each step."""
    config = tiny(f"--config.train.grad_accum={grad_accum}")
    program = program_lib.build(config, _mesh(config, shape))
    state = program.init()
    ckpt = Checkpointer(workdir, keep=5, keep_every=0) if workdir else None
    pipeline = build_train_pipeline(config) if workdir else None
    losses = []
    for local in batches():
        batch = {k: jax.device_put(v, program.batch_shardings[k]) for k, v in local.items()}
        state, metrics = program.step(state, batch)
        losses.append(float(metrics["loss"]))
        if ckpt:
            next(pipeline)
            ckpt.save(state, pipeline)
    if ckpt:
        ckpt.close()
    return {"losses": losses, "params": _numpy(state.params), "program": program,
            "state": state}


def _assert_params_close(a, b, atol=2e-5):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    for (path, x), y in zip(flat_a, flat_b):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mesh222"))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_mesh_shapes_match_one_device(shape, ckpt_dir):
    ref = run()
    got = run(shape, 1, ckpt_dir if shape == (2, 2, 2) else None)
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5)
    assert got["losses"][-1] < got["losses"][0]  # it learns
    _assert_params_close(got["params"], ref["params"])


def test_fsdp_and_tensor_parallel_really_shard(ckpt_dir):
    state = run((2, 4, 1))["state"]
    emb = state.params["text"]["token_embedding"]  # logical ('vocab', 'embed')
    assert emb.sharding.spec == jax.sharding.PartitionSpec("model", "fsdp")
    assert {s.data.shape for s in emb.addressable_shards} == {(49408, 16)}  # 64 / fsdp 4
    fc = state.params["image"]["transformer"]["blocks_0"]["mlp"]["fc_kernel"]
    assert fc.addressable_shards[0].data.shape == (16, 256)
    # The optimizer moments live where their params live.
    mu = state.opt_state[1][0].mu["text"]["token_embedding"]
    assert mu.sharding == emb.sharding
    # Tensor parallel: on (2, 2, 2) the MLP's hidden dim is split over `model`.
    fc = run((2, 2, 2), 1, ckpt_dir)["program"].abstract_state.params["image"]["transformer"][
        "blocks_0"]["mlp"]["fc_kernel"]
    assert fc.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
    assert fc.sharding.shard_shape(fc.shape) == (32, 128)


def test_grad_accumulation_equals_one_big_step():
    whole = run((2, 4, 1))
    accum = run((2, 4, 1), 4)
    np.testing.assert_allclose(accum["losses"], whole["losses"], rtol=1e-5)
    _assert_params_close(accum["params"], whole["params"])


def _two_steps(config, shape, params=None):
    program = program_lib.build(config, _mesh(config, shape))
    state, losses = program.init(), []
    if params is not None:
        state = state.replace(params=jax.device_put(params, program.state_shardings.params))
    for local in batches()[:2]:
        state, metrics = program.step(state, program.global_batch(local))
        losses.append(float(metrics["loss"]))
    return losses, state, metrics


def test_sigmoid_ring_loss_on_a_mesh_matches_dense_on_one_device():
    """SigLIP wiring: logit bias, sigmoid loss, ring over both batch axes of (2, 2, 2)."""
    sigmoid = ("--config.loss.kind=sigmoid", "--config.model.use_logit_bias=true")
    dense, _, _ = _two_steps(tiny(*sigmoid), (1, 1, 1))
    ring, state, metrics = _two_steps(tiny(*sigmoid, "--config.loss.impl=ring"), (2, 2, 2))
    np.testing.assert_allclose(ring, dense, rtol=1e-5)
    assert "logit_bias" in metrics and float(state.params["logit_bias"]) != -10.0


def test_bf16_compute_with_scanned_rematerialised_layers():
    config = tiny("--config.model.dtype=bfloat16", "--config.model.scan_layers=true",
                  "--config.model.remat=dots")
    from clipjax.models import stack_layers

    unrolled = run()["program"].init().params  # the reference's init, in the scanned layout
    losses, state, _ = _two_steps(config, (8, 1, 1), stack_layers(_numpy(unrolled)))
    ref = run()["losses"][:2]
    np.testing.assert_allclose(losses, ref, rtol=2e-2)  # bf16 matmuls, same init
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype("float32")}
    assert "blocks" in state.params["image"]["transformer"]  # one scanned stack


def test_restore_onto_another_mesh_shape(ckpt_dir):
    saved = run((2, 2, 2), 1, ckpt_dir)
    assert checkpoint.finalized_steps(ckpt_dir) == [1, 2, 3]
    config = tiny()
    program = program_lib.build(config, _mesh(config, (8, 1, 1)))
    pipeline = build_train_pipeline(config)
    state = Checkpointer(ckpt_dir, keep=5, keep_every=0).restore_latest(
        program.abstract_state, pipeline)
    assert int(state.step) == STEPS
    emb = state.params["text"]["token_embedding"]
    assert emb.sharding.mesh.shape == {"data": 8, "fsdp": 1, "model": 1}
    jax.tree.map(np.testing.assert_array_equal, _numpy(state.params), saved["params"])
    # The data iterator continues where the saved run was.
    fresh = build_train_pipeline(config)
    for _ in range(STEPS):
        next(fresh)
    np.testing.assert_array_equal(next(pipeline)["text"], next(fresh)["text"])


def test_corrupt_latest_checkpoint_falls_back(ckpt_dir, tmp_path, caplog):
    run((2, 2, 2), 1, ckpt_dir)
    workdir = str(tmp_path / "w")
    shutil.copytree(ckpt_dir, workdir)
    params_dir = os.path.join(checkpoint.checkpoint_dir(workdir), "3", "params")
    for root, _, files in os.walk(params_dir):  # tear every array file of step 3
        for name in files:
            if not name.endswith((".json", "_METADATA")) and "manifest" not in name:
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(7)
    config = tiny()
    program = run()["program"]
    with caplog.at_level(logging.WARNING, logger="clipjax.train"):
        state = Checkpointer(workdir, keep=5, keep_every=0).restore_latest(
            program.abstract_state, build_train_pipeline(config))
    assert int(state.step) == 2
    assert "is corrupt" in caplog.text
    assert checkpoint.finalized_steps(workdir) == [1, 2]
    assert os.path.isdir(os.path.join(checkpoint.checkpoint_dir(workdir), "3.corrupt-0"))


@pytest.mark.parametrize("change", ["--config.model.text.width=32", "--config.optim.name=lion"])
def test_resuming_another_model_or_optimizer_is_refused_not_quarantined(ckpt_dir, tmp_path,
                                                                        change):
    run((2, 2, 2), 1, ckpt_dir)
    workdir = str(tmp_path / "w")
    shutil.copytree(ckpt_dir, workdir)
    config = tiny(change)
    program = program_lib.build(config, _mesh(config, (8, 1, 1)))  # no compile needed
    with pytest.raises(ClipjaxError, match="different model|another optimizer"):
        Checkpointer(workdir, keep=5, keep_every=0).restore_latest(
            program.abstract_state, build_train_pipeline(config))
    assert checkpoint.finalized_steps(workdir) == [1, 2, 3]


def test_nonfinite_loss_skips_the_update():
    program = run()["program"]
    state = program.init()
    before = _numpy(state.params)
    bad = dict(batches()[0])
    bad["image"] = np.full_like(bad["image"], np.nan)
    state, metrics = program.step(state, program.global_batch(bad))
    assert not np.isfinite(float(metrics["loss"]))
    assert int(metrics["skipped"]) == 1 and int(state.nonfinite) == 1 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, _numpy(state.params), before)


def test_nonfinite_stop_checkpoints_last_finite_state(tmp_path):
    """The loss goes non-finite long before the loop looks (every 5 steps, no per-step
    device_get): the frozen state, that step's metrics and the input position after it
    are what is saved."""
    workdir = str(tmp_path / "w")
    config = tiny("--config.train.nonfinite=stop", "--config.optim.lr=1e30",
                  "--config.optim.warmup_steps=0", "--config.optim.clip_norm=0.0",
                  "--config.train.peak_flops=1e11", "--config.train.steps=6",
                  "--config.train.log_every=5", "--config.train.ckpt_every=100")
    status = loop.train(config, workdir, progress=False)
    assert status == loop.EXIT_NONFINITE
    rows = _rows(workdir)
    assert not math.isfinite(rows[-1]["loss"]) and rows[-1]["nonfinite_steps"] == 1
    step = checkpoint.finalized_steps(workdir)[-1]
    assert step == rows[-1]["step"] < 5
    params = checkpoint.restore_params(workdir, step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_numpy(params)))
    (data_file,) = glob.glob(os.path.join(workdir, "checkpoints", str(step), "data",
                                          "process_*.json"))
    reference = build_train_pipeline(config)
    for _ in range(step):
        next(reference)
    with open(data_file) as f:
        assert json.load(f)["next_record"] == reference.get_state()["next_record"]
    reference.close()


def test_frozen_step_returns_the_state_unchanged():
    config = tiny("--config.train.nonfinite=stop")
    program = program_lib.build(config, _mesh(config, (8, 1, 1)))
    state = program.init()
    bad = dict(batches()[0])
    bad["image"] = np.full_like(bad["image"], np.nan)
    state, out = program.step(state, program.global_batch(bad))
    assert int(out["skipped"]) == 1 and int(out["frozen"]) == 0 and int(state.step) == 1
    before = _numpy(state)
    state, out = program.step(state, program.global_batch(batches()[1]))  # finite, but frozen
    assert int(out["skipped"]) == 0 and int(out["frozen"]) == 1
    jax.tree.map(np.testing.assert_array_equal, _numpy(state), before)


def _rows(workdir):
    from clipjax import metrics

    return metrics.read(workdir)


def test_frozen_tower_and_warm_start(tmp_path):
    """LiT: the image tower comes from another checkpoint, stays put, and has no optimizer
    state; the text tower trains."""
    source = str(tmp_path / "imported")
    donor = run()["params"]
    checkpoint.save_params(source, jax.tree.map(np.asarray, donor), tiny())
    workdir = str(tmp_path / "lit")
    config = tiny("--config.optim.frozen=image/.*", f"--config.train.init_from={source}",
                  "--config.train.init_from_keys=image/.*", "--config.train.steps=2",
                  "--config.train.peak_flops=1e11")
    assert loop.train(config, workdir, progress=False) == 0
    trained = _numpy(checkpoint.restore_params(workdir, 2))
    jax.tree.map(np.testing.assert_array_equal, trained["image"], donor["image"])
    program = program_lib.build(config, _mesh(config, (1, 1, 1)))
    fresh = _numpy(program.init().params)
    assert not np.allclose(trained["text"]["text_projection"], fresh["text"]["text_projection"])
    # Frozen params carry no optimizer state: Adam's moments exist for text params only.
    moments = [x for x in jax.tree.leaves(program.abstract_state.opt_state) if x.shape != ()]
    assert len(moments) == 2 * len(jax.tree.leaves(donor["text"]))


def test_uint8_images_normalised_in_the_step_equal_the_float_path():
    """The trainer sends uint8 pixels (a quarter of the bytes) and normalises on the
    device; the same step on the host-normalised float batch gives the same numbers."""
    from clipjax.data.preprocess import normalize

    program = run()["program"]
    config = tiny()
    raw = next(build_train_pipeline(config, normalize=False))
    assert raw["image"].dtype == np.uint8
    host = dict(raw, image=normalize(raw["image"], config.model.image.mean,
                                     config.model.image.std))
    state = program.init()
    _, m_uint8 = program.step(state, program.global_batch(raw))
    state = program.init()
    _, m_float = program.step(state, program.global_batch(host))
    np.testing.assert_allclose(float(m_uint8["loss"]), float(m_float["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_uint8["grad_norm"]), float(m_float["grad_norm"]),
                               rtol=1e-5)
