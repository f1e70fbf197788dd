"""Where a run lives: relative, absolute and `gs://` workdirs, and a restore policy that
never discards a good checkpoint. `clipjax train` runs as users run it (subprocesses);
`gs://` is a real GCS API server (fake-gcs-server) started by the tests.

The session's reference run (conftest's `cli_reference`, `--workdir runs/ref` typed from
another directory, augmentation on) is what every other run here must end with, its
losses and params bit for bit: preempted, killed and resumed on the bucket, fallen back
from a corrupt checkpoint, started fresh after every checkpoint failed.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import jax
import numpy as np
import pytest
import train_cli
from gcs_server import BUCKET, GcsServer
from train_cli import STEPS

from clipjax import checkpoint, metrics, paths

pytestmark = pytest.mark.slow
CHECKPOINTS = [8, 12, 16]  # keep=2 and keep_every=8 of checkpoints every 4 steps


def _args(workdir, cli_data, *extra, steps=STEPS):
    return train_cli.reference_args(workdir, cli_data, *extra, steps=steps)


def _assert_same_run(workdir, reference):
    rows = metrics.read(workdir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in reference["rows"]]
    assert [r["grad_norm"] for r in rows] == [r["grad_norm"] for r in reference["rows"]]
    jax.tree.map(np.testing.assert_array_equal, train_cli.final_params(workdir),
                 reference["params"])
    jax.tree.map(np.testing.assert_array_equal, train_cli.final_params(workdir, which="ema"),
                 reference["ema"])


def _corrupt_dirs(workdir):
    return [n for n in paths.listdir(checkpoint.checkpoint_dir(workdir)) if "corrupt" in n]


def _array_files(step_dir):
    """The array data files of a checkpoint step (what a lost object would be)."""
    return [f for f in paths.walk_files(step_dir)
            if "/d/" in os.fspath(f) and "/params/" in os.fspath(f)]


def test_relative_workdir_resumes_and_refuses_a_changed_batch(cli_reference, cli_data):
    cwd = cli_reference["cwd"]
    # Resuming a finished run is a no-op that leaves its config.json as trained.
    before = open(os.path.join(cli_reference["workdir"], "config.json")).read()
    code, out = train_cli.finish(train_cli.start(
        _args("runs/ref", cli_data, "--config.train.log_every=3"), cwd=cwd))
    assert code == 0 and f"already at step {STEPS}" in out, out[-2000:]
    assert open(os.path.join(cli_reference["workdir"], "config.json")).read() == before
    # Another global batch would silently be another run: refused, naming the key.
    code, out = train_cli.finish(train_cli.start(
        _args("runs/ref", cli_data, "--config.data.batch_size=8", steps=STEPS + 4), cwd=cwd))
    assert code == 2 and "config.data.batch_size" in out, out[-2000:]
    assert checkpoint.finalized_steps(cli_reference["workdir"]) == CHECKPOINTS
    assert open(os.path.join(cli_reference["workdir"], "config.json")).read() == before


def test_gcs_workdir_sigterm_sigkill_and_resume_is_exact(cli_reference, cli_data, gcs_env,
                                                         tmp_path):
    """The run lives on the bucket only: preempted (SIGTERM), resumed, killed between
    checkpoints (SIGKILL), resumed again: the reference run, bit for bit."""
    gcs = gcs_env  # this process reads the bucket too (metrics, params)
    workdir = f"gs://{BUCKET}/sigkill/run"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    mirror = str(gcs.object_path("sigkill/run"))  # the server's own files: fast to poll

    def start():
        return train_cli.start(_args(workdir, cli_data), cwd=str(cwd), extra_env=gcs.env())

    def finalized():
        ckpts = os.path.join(mirror, "checkpoints")
        return sorted(int(n) for n in (os.listdir(ckpts) if os.path.isdir(ckpts) else [])
                      if os.path.exists(os.path.join(ckpts, n, "commit_success.txt")))

    def rows():
        try:
            return metrics.read(mirror) if os.path.isdir(mirror) else []
        except ValueError:  # a part file being rewritten
            return []

    # 1. Preemption: SIGTERM → checkpoint at the next step, exit 0.
    proc = start()
    train_cli.wait_for(proc, lambda: len(rows()) >= 3, "step 3")
    proc.send_signal(signal.SIGTERM)
    code, out = train_cli.finish(proc)
    assert code == 0 and "SIGTERM" in out, out[-3000:]
    stopped = checkpoint.finalized_steps(workdir)[-1]
    assert 3 <= stopped < STEPS

    # 2. Resume, then SIGKILL between checkpoints: the steps after the last one are lost.
    proc = start()

    def past_a_new_checkpoint():
        steps, r = [s for s in finalized() if s > stopped], rows()
        return steps and r and r[-1]["step"] > steps[-1]

    train_cli.wait_for(proc, past_a_new_checkpoint, "a row past a new checkpoint")
    proc.send_signal(signal.SIGKILL)
    code, out = train_cli.finish(proc)
    assert code == -signal.SIGKILL and f"resumed from step {stopped}" in out, out[-3000:]
    last_good = checkpoint.finalized_steps(workdir)[-1]
    assert last_good < STEPS

    # 3. Resume to the end: the same losses and grad norms, step for step, and params.
    code, out = train_cli.finish(start())
    assert code == 0, out[-3000:]
    assert f"resumed from step {last_good}" in out
    _assert_same_run(workdir, cli_reference)
    assert not list(cwd.iterdir()), "the run wrote to the local disk"
    names = gcs.objects("sigkill/run/")
    assert "sigkill/run/config.json" in names
    assert any(n.startswith("sigkill/run/tb/") and "tfevents" in n for n in names)

    # 4. A lost array object is corruption: that checkpoint is moved aside, the previous
    # one resumes, and the run ends exactly where the uninterrupted one did.
    for f in _array_files(checkpoint.step_dir(workdir, STEPS)):
        f.unlink()
    code, out = train_cli.finish(start())
    assert code == 0, out[-3000:]
    assert f"resumed from step {STEPS - 4}" in out and "is corrupt" in out, out[-3000:]
    assert _corrupt_dirs(workdir) == [f"{STEPS}.corrupt-0"]
    _assert_same_run(workdir, cli_reference)


def test_every_checkpoint_corrupt_starts_fresh_exactly(cli_reference, cli_data, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(cli_reference["workdir"], workdir)
    for step in checkpoint.finalized_steps(workdir):
        for f in _array_files(checkpoint.step_dir(workdir, step)):
            f.unlink()
    code, out = train_cli.finish(train_cli.start(_args(workdir, cli_data)))
    assert code == 0, out[-3000:]
    assert "resumed" not in out
    assert sorted(_corrupt_dirs(workdir)) == sorted(f"{s}.corrupt-0" for s in CHECKPOINTS)
    _assert_same_run(workdir, cli_reference)  # the data iterator started anew, too


def test_unreadable_checkpoint_stops_and_moves_nothing(cli_reference, cli_data, tmp_path):
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("root without setpriv: permissions cannot be taken away")
    workdir = str(tmp_path / "w")
    shutil.copytree(cli_reference["workdir"], workdir)
    victim = _array_files(checkpoint.step_dir(workdir, STEPS))[0]
    os.chmod(victim, 0)
    rows_before = open(os.path.join(workdir, "metrics.jsonl")).read()
    # As root, drop the capabilities that let root read any file.
    prefix = (["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
              if os.geteuid() == 0 else [])
    code, out = train_cli.finish(train_cli.start(_args(workdir, cli_data, steps=STEPS + 4),
                                                 prefix=prefix))
    assert code != 0, out[-3000:]
    assert checkpoint.step_dir(workdir, STEPS) in out and "nothing was moved" in out, out[-3000:]
    assert "Traceback" not in out
    assert checkpoint.finalized_steps(workdir) == CHECKPOINTS and not _corrupt_dirs(workdir)
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == rows_before


def test_changed_data_workers_resumes_and_moves_no_checkpoint(cli_reference, cli_data,
                                                               tmp_path):
    """The sample order does not depend on the decode workers: 0 → 2 workers resumes."""
    workdir = str(tmp_path / "w")
    shutil.copytree(cli_reference["workdir"], workdir)
    code, out = train_cli.finish(train_cli.start(
        _args(workdir, cli_data, "--config.data.workers=2", steps=STEPS + 4)))
    assert code == 0 and f"resumed from step {STEPS}" in out, out[-3000:]
    # keep=2 and keep_every=8 after step 20: 8, 16, 20; nothing moved aside.
    assert checkpoint.finalized_steps(workdir) == [8, STEPS, STEPS + 4]
    assert not _corrupt_dirs(workdir)
    history = open(os.path.join(workdir, "config_history.jsonl")).read()
    assert '"data.workers": {"from": 0, "to": 2}' in history


@pytest.fixture
def outage_server(tmp_path):
    """A GCS server of this test's own, to stop and start again."""
    server = GcsServer(tmp_path / "outage").start()
    yield server
    server.stop()


def test_gcs_outage_during_save_and_restore_is_retried(cli_reference, cli_data, outage_server,
                                                       tmp_path):
    server = outage_server
    workdir = f"gs://{BUCKET}/outage/run"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # 1. The server goes away for 3 s right after the first checkpoint is committed,
    # while the run goes on and saves the next ones.
    proc = train_cli.start(_args(workdir, cli_data), cwd=str(cwd), extra_env=server.env())
    marker = server.object_path("outage/run/checkpoints/4/commit_success.txt")
    train_cli.wait_for(proc, marker.exists, "the first checkpoint")
    server.stop()
    time.sleep(3)
    server.start()
    code, out = train_cli.finish(proc)
    assert code == 0, out[-3000:]
    # 2. The server is down when the run is started again (it lists and restores its
    # latest checkpoint before it finds it has nothing left to do); back after 3 s.
    server.stop()
    proc = train_cli.start(_args(workdir, cli_data), cwd=str(cwd), extra_env=server.env())
    threading.Timer(3.0, server.start).start()
    code, out = train_cli.finish(proc)
    assert code == 0, out[-3000:]
    assert f"already at step {STEPS}" in out, out[-3000:]
    names = server.objects("outage/run/checkpoints/")
    assert not [n for n in names if "corrupt" in n]
    for step in CHECKPOINTS:
        assert f"outage/run/checkpoints/{step}/commit_success.txt" in names
    # The server keeps each object as a file under its root: that tree is the workdir.
    _assert_same_run(str(server.object_path("outage/run")), cli_reference)
