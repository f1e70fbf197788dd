"""Ctrl-C and a dead data worker, in `clipjax train` subprocesses as a user meets them.

One run is interrupted with SIGINT sent to its whole process group (what a terminal's
Ctrl-C does, so the grain workers get it too): it saves, says so, exits 130. The same
workdir then resumes, and one of its data workers is SIGKILLed: the run fails within
seconds with one line naming the worker, after saving its last step. The first run also
has an injected peak of 1 FLOP/s: MFU > 1 must be warned about, naming that peak.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import train_cli

from clipjax import checkpoint
from clipjax.train.loop import Preemption


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals") / "pairs"
    root.mkdir()
    return train_cli.make_pairs(root)


def _start(workdir, data_dir, ckpt_every=100_000):
    cmd = train_cli.args(workdir, data_dir, "--config.data.workers=2",
                         "--config.train.peak_flops=1.0", steps=100_000, ckpt_every=ckpt_every)
    return subprocess.Popen(cmd, cwd=train_cli.REPO, env=train_cli.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, as a terminal's job


def _rows_past(workdir, step):
    return lambda: any(r["step"] > step for r in train_cli.local_rows(workdir))


def _data_workers(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if ppid == pid and b"multiprocessing.spawn" in cmdline:
            out.append(int(entry))
    return out


def test_ctrl_c_saves_then_a_killed_worker_fails_fast_and_saves(tmp_path, data):
    workdir = str(tmp_path / "run")

    # ---- Ctrl-C: SIGINT to the process group, workers included.
    proc = _start(workdir, data)
    train_cli.wait_for(proc, _rows_past(workdir, 1), "two logged steps")
    os.killpg(proc.pid, signal.SIGINT)
    code, out = train_cli.finish(proc)
    assert code == 130, out[-3000:]
    assert "Ctrl-C: saving a checkpoint after this step" in out
    saved = [line for line in out.splitlines() if "SIGINT: saved step" in line]
    assert len(saved) == 1, out[-3000:]
    step = int(saved[0].split("saved step ")[1].split(",")[0])
    assert step >= 2 and step in checkpoint.finalized_steps(workdir)
    assert "Traceback" not in out, out[-3000:]
    assert "the peak used, 1e-12 TFLOP/s per device (train.peak_flops), is too low" in out, \
        out[-3000:]

    # ---- Resume, then SIGKILL one data worker: an error within 30 s, naming it. (A
    # regular save first: a run's first save compiles orbax's slicing programs, ~20 s on
    # a loaded 2-core machine, which is not what this measures.)
    proc = _start(workdir, data, ckpt_every=step + 2)
    train_cli.wait_for(proc, lambda: step + 2 in checkpoint.finalized_steps(workdir),
                       "a checkpoint after the resume")
    train_cli.wait_for(proc, _rows_past(workdir, step + 3), "steps after that checkpoint")
    workers = _data_workers(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)
    t0 = time.monotonic()
    code, out = train_cli.finish(proc, timeout=60)
    elapsed = time.monotonic() - t0
    assert f"resumed from step {step}" in out
    assert code == 1 and elapsed < 30, (elapsed, out[-3000:])
    assert (f"clipjax train: error: a data worker process (pid {workers[0]}) died of signal "
            "SIGKILL") in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    died = [line for line in out.splitlines() if "a data worker died at step" in line]
    assert len(died) == 1, out[-3000:]
    last = int(died[0].split("died at step ")[1].split(":")[0])
    # Saved then (or already, when it was a ckpt_every step): the run resumes from there.
    assert last > step + 2 and last in checkpoint.finalized_steps(workdir), out[-3000:]


def test_a_second_ctrl_c_aborts_at_once():
    with Preemption() as preemption:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs in the main thread between bytecodes
        assert preemption.requested and preemption.reason == "SIGINT"
        assert preemption.exit_status == 130 and preemption.agreed(1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    with Preemption() as preemption:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert preemption.reason == "SIGTERM" and preemption.exit_status == 0
