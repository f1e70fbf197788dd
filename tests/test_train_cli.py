"""`clipjax train` as users run it: subprocesses on an emulated 8-device CPU mesh.

The session's reference run (conftest's `cli_reference`: webdataset shards of real
PNG files with two captions each, read with random resized crops, flips and a random
caption) is what the same training as 2 processes x 4 devices must reproduce: every
draw follows (seed, epoch, global position), so the global batch of a step is the
same however many processes read it. (Interrupted and resumed runs: test_run_storage.)
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
import train_cli
from train_cli import REPO, STEPS, TIMEOUT, wait_for

from clipjax import checkpoint


def _start(args, devices=8):
    return train_cli.start(args, devices)


_finish = train_cli.finish
_rows = train_cli.local_rows


def test_invalid_config_exits_2_naming_the_key_before_compiling(tmp_path):
    workdir = tmp_path / "w"
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "clipjax", "train", "--config", "configs/tiny.py",
         "--workdir", str(workdir), "--config.optim.name=adamm"],
        cwd=REPO, env=train_cli.env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 2, r.stderr
    assert "config.optim.name" in r.stderr and "adamm" in r.stderr
    assert not workdir.exists()  # nothing was written, nothing compiled
    assert "compiled" not in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "clipjax", "train", "--config", "configs/tiny.py",
         "--workdir", str(workdir), "--config.train.grad_accum=3"],
        cwd=REPO, env=train_cli.env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 2 and "config.train.grad_accum" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 120


def test_run_writes_the_workdir_and_metrics(cli_reference):
    workdir, rows = cli_reference["workdir"], cli_reference["rows"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "images_per_sec", "mfu", "i2t_acc", "t2i_acc", "logit_scale",
                "grad_norm", "param_norm", "examples_seen", "step_time",
                "images_per_sec_per_device", "skipped_samples", "nonfinite_steps"):
        assert key in rows[-1], key
    assert rows[-1]["examples_seen"] == 16 * STEPS
    assert rows[-1]["images_per_sec"] > 0 and 0 < rows[-1]["mfu"] < 1
    assert rows[0]["lr"] == 0.0 and rows[2]["lr"] > rows[1]["lr"] > 0  # warmup
    assert rows[-1]["loss"] < rows[0]["loss"]
    # keep = 2 keeps the last two (12, 16); keep_every = 8 keeps 8 as well; 4 is gone.
    assert checkpoint.finalized_steps(workdir) == [8, 12, 16]
    config = checkpoint.read_config(workdir)
    assert config.train.steps == STEPS and config.data.train.source == "webdataset"
    assert os.listdir(os.path.join(workdir, "tb"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(workdir, data_dir):
    """The run as 2 processes x 4 devices over a 127.0.0.1 coordinator."""
    port = _free_port()
    return [
        _start(train_cli.reference_args(workdir, data_dir, "--config.runtime.distributed=on",
                     f"--config.runtime.coordinator_address=127.0.0.1:{port}",
                     "--config.runtime.num_processes=2", f"--config.runtime.process_id={i}"),
               devices=4)
        for i in range(2)]


def test_two_processes_match_one(cli_reference, cli_data, tmp_path):
    """The reference run as 2 processes x 4 devices, started the way a user starts a
    2-host job on one machine (`launch/cpu_mesh.sh multiprocess`): the same losses,
    params and EMA as 1 process x 8 devices, augmentation on."""
    workdir = str(tmp_path / "multi")
    cmd = train_cli.reference_args(workdir, cli_data)
    at = {cmd.index("--config"), cmd.index("--workdir")}
    rest = [a for i, a in enumerate(cmd[4:], 4) if i not in at and i - 1 not in at]
    launcher = [os.path.join(REPO, "launch", "cpu_mesh.sh"), "multiprocess",
                cmd[cmd.index("--config") + 1], workdir, *rest]
    env = {"CLIPJAX": os.path.join(os.path.dirname(sys.executable), "clipjax"),
           "TIMEOUT": str(TIMEOUT), "XLA_FLAGS": train_cli.xla_flags()}  # it adds DEVICES=4
    code, out = _finish(train_cli.start(["bash", *launcher], extra_env=env))
    assert code == 0, out[-3000:]
    assert "[process 0] clipjax train: mesh {'data': 8" in out, out[-3000:]
    assert "[process 1] " in out and "8 devices, 2 processes" in out
    rows, ref = _rows(workdir), cli_reference["rows"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref], rtol=1e-5)
    for which in ("params", "ema"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                     train_cli.final_params(workdir, which="raw" if which == "params" else
                                            which), cli_reference[which])


def test_two_processes_sigterm_to_one_both_save_the_same_step(cli_data, tmp_path):
    """A preemption notice reaches one host: both save the same step and exit 0 (JAX's
    preemption service agrees on the step; no collective per step)."""
    workdir = str(tmp_path / "multi-sigterm")
    procs = _two_processes(workdir, cli_data)
    wait_for(procs[0], lambda: len(_rows(workdir)) >= 3, "step 3")
    procs[1].send_signal(signal.SIGTERM)
    results = [_finish(p) for p in procs]
    for code, out in results:
        assert code == 0, out[-3000:]
    saved = [int(line.split("saved step ")[1].split(",")[0]) for _, out in results
             for line in out.splitlines() if "SIGTERM: saved step" in line]
    assert len(saved) == 2 and saved[0] == saved[1], [out[-1500:] for _, out in results]
    assert 3 <= saved[0] < STEPS
    assert checkpoint.finalized_steps(workdir)[-1] == saved[0]
