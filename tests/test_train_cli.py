"""`clipjax train` as users run it: subprocesses on an emulated 8-device CPU mesh.

One uninterrupted run is the reference for (a) a run that is sent SIGTERM,
restarted, killed with SIGKILL between checkpoints and restarted again, whose
losses and final params must equal the reference's bit for bit, and (b) the
same training as 2 processes × 4 devices. The data is webdataset shards of real
PNG files with two captions each, read with random resized crops, flips and a
random caption: every draw follows (seed, epoch, global position), so the global
batch of a step is the same however many processes read it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import train_cli
from train_cli import REPO, TIMEOUT, wait_for

from clipjax import checkpoint

STEPS, CKPT_EVERY = 32, 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return train_cli.make_pairs(tmp_path_factory.mktemp("pairs"))


# FLIP patch dropout (half of the 16 patches) and an EMA of the params ride along: the
# kept patches are drawn like the crops, and the EMA is saved and restored with the state.
RECIPES = ("--config.model.image.patch_dropout=0.5", "--config.train.ema_decay=0.9")


def _args(workdir, data_dir, *extra):
    """Webdataset shards, augmentation on: crops, flips, caption and kept-patch draws all
    follow (seed, epoch, global position), whatever the process count and through resumes."""
    return train_cli.args(workdir, data_dir, *train_cli.augmented_shards(data_dir), *RECIPES,
                          *extra, steps=STEPS, ckpt_every=CKPT_EVERY)


def _env(devices=8):
    return train_cli.env(devices)


def _start(args, devices=8):
    return train_cli.start(args, devices)


_finish = train_cli.finish
_rows = train_cli.local_rows
_wait_for = wait_for


def _params(workdir, step, which="raw"):
    """Params (or their EMA) restored whole onto one device, whatever topology wrote them
    (no abstract tree given: the checkpoint's own metadata, also for a 2-process one)."""
    return jax.tree.map(np.asarray, checkpoint.restore_params(workdir, step, which=which))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    code, out = _finish(_start(_args(workdir, data_dir)))
    assert code == 0, out[-3000:]
    return {"workdir": str(workdir), "rows": _rows(workdir), "out": out}


def test_invalid_config_exits_2_naming_the_key_before_compiling(tmp_path):
    workdir = tmp_path / "w"
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "clipjax", "train", "--config", "configs/tiny.py",
         "--workdir", str(workdir), "--config.optim.name=adamm"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 2, r.stderr
    assert "config.optim.name" in r.stderr and "adamm" in r.stderr
    assert not workdir.exists()  # nothing was written, nothing compiled
    assert "compiled" not in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "clipjax", "train", "--config", "configs/tiny.py",
         "--workdir", str(workdir), "--config.train.grad_accum=3"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 2 and "config.train.grad_accum" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 120


def test_run_writes_the_workdir_and_metrics(reference):
    workdir, rows = reference["workdir"], reference["rows"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "images_per_sec", "mfu", "i2t_acc", "t2i_acc", "logit_scale",
                "grad_norm", "param_norm", "examples_seen", "step_time",
                "images_per_sec_per_device", "skipped_samples", "nonfinite_steps"):
        assert key in rows[-1], key
    assert rows[-1]["examples_seen"] == 16 * STEPS
    assert rows[-1]["images_per_sec"] > 0 and 0 < rows[-1]["mfu"] < 1
    assert rows[0]["lr"] == 0.0 and rows[2]["lr"] > rows[1]["lr"] > 0  # warmup
    assert rows[-1]["loss"] < rows[0]["loss"]
    # keep = 2 keeps the last two (24, 32); keep_every = 16 keeps 16 as well; 8 is gone.
    assert checkpoint.finalized_steps(workdir) == [16, 24, 32]
    config = checkpoint.read_config(workdir)
    assert config.train.steps == STEPS and config.data.train.source == "webdataset"
    assert os.listdir(os.path.join(workdir, "tb"))


def test_sigterm_and_sigkill_then_resume_is_exact(reference, data_dir, tmp_path):
    workdir = str(tmp_path / "interrupted")
    args = _args(workdir, data_dir)

    # 1. Preemption: SIGTERM → checkpoint at the next step, exit 0.
    proc = _start(args)
    _wait_for(proc, lambda: len(_rows(workdir)) >= 3, "step 3")
    proc.send_signal(signal.SIGTERM)
    code, out = _finish(proc)
    assert code == 0, out[-3000:]
    stopped = checkpoint.finalized_steps(workdir)[-1]
    assert 3 <= stopped < STEPS and "SIGTERM" in out

    # 2. Resume, then SIGKILL between checkpoints: the steps after the last one are lost.
    proc = _start(args)

    def past_a_new_checkpoint():
        steps = [s for s in checkpoint.finalized_steps(workdir) if s > stopped]
        rows = _rows(workdir)
        return steps and rows and rows[-1]["step"] > steps[-1]

    _wait_for(proc, past_a_new_checkpoint, "a checkpoint after the restart")
    proc.send_signal(signal.SIGKILL)
    code, out = _finish(proc)
    assert code == -signal.SIGKILL
    assert f"resumed from step {stopped}" in out
    killed_at = _rows(workdir)[-1]["step"]
    last_good = checkpoint.finalized_steps(workdir)[-1]
    assert last_good < killed_at < STEPS, (last_good, killed_at)

    # 3. Resume to the end: the same losses, step for step, and the same params.
    code, out = _finish(_start(args))
    assert code == 0, out[-3000:]
    assert f"resumed from step {last_good}" in out
    rows, ref = _rows(workdir), reference["rows"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]
    assert [r["grad_norm"] for r in rows] == [r["grad_norm"] for r in ref]
    for which in ("raw", "ema"):
        mine = _params(workdir, STEPS, which)
        theirs = _params(reference["workdir"], STEPS, which)
        jax.tree.map(np.testing.assert_array_equal, mine, theirs)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(workdir, data_dir):
    """The run as 2 processes x 4 devices over a 127.0.0.1 coordinator."""
    port = _free_port()
    return [
        _start(_args(workdir, data_dir, "--config.runtime.distributed=on",
                     f"--config.runtime.coordinator_address=127.0.0.1:{port}",
                     "--config.runtime.num_processes=2", f"--config.runtime.process_id={i}"),
               devices=4)
        for i in range(2)]


def test_two_processes_match_one(reference, data_dir, tmp_path):
    workdir = str(tmp_path / "multi")
    procs = _two_processes(workdir, data_dir)
    results = [_finish(p) for p in procs]
    for code, out in results:
        assert code == 0, out[-3000:]
    assert "8 devices, 2 processes" in results[0][1]
    rows, ref = _rows(workdir), reference["rows"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref], rtol=1e-5)
    mine, theirs = _params(workdir, STEPS), _params(reference["workdir"], STEPS)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 mine, theirs)


def test_two_processes_sigterm_to_one_both_save_the_same_step(data_dir, tmp_path):
    """A preemption notice reaches one host: both save the same step and exit 0 (JAX's
    preemption service agrees on the step; no collective per step)."""
    workdir = str(tmp_path / "multi-sigterm")
    procs = _two_processes(workdir, data_dir)
    _wait_for(procs[0], lambda: len(_rows(workdir)) >= 3, "step 3")
    procs[1].send_signal(signal.SIGTERM)
    results = [_finish(p) for p in procs]
    for code, out in results:
        assert code == 0, out[-3000:]
    saved = [int(line.split("saved step ")[1].split(",")[0]) for _, out in results
             for line in out.splitlines() if "SIGTERM: saved step" in line]
    assert len(saved) == 2 and saved[0] == saved[1], [out[-1500:] for _, out in results]
    assert 3 <= saved[0] < STEPS
    assert checkpoint.finalized_steps(workdir)[-1] == saved[0]
