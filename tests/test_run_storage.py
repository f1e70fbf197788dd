"""Where a run lives: relative, absolute and `gs://` workdirs, and a restore policy that
never discards a good checkpoint. `clipjax train` runs as users run it (subprocesses);
`gs://` is a real GCS API server (fake-gcs-server) started by the tests.

One uninterrupted run in a relative workdir is the reference: every other run here
(killed and resumed on the bucket, fallen back from a corrupt checkpoint, started
fresh after every checkpoint failed) must end with its losses and params, bit for bit.
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

from clipjax import checkpoint, metrics, paths

STEPS, CKPT_EVERY = 12, 4
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return train_cli.make_pairs(tmp_path_factory.mktemp("pairs"))


def _args(workdir, data_dir, *extra, steps=STEPS):
    return train_cli.args(workdir, data_dir, "--config.train.keep=5", *extra, steps=steps,
                          ckpt_every=CKPT_EVERY)


def _params(workdir, step):
    return jax.tree.map(np.asarray, checkpoint.restore_params(workdir, step))


def _assert_same_run(workdir, reference):
    rows = metrics.read(workdir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in reference["rows"]]
    jax.tree.map(np.testing.assert_array_equal, _params(workdir, STEPS), reference["params"])


def _corrupt_dirs(workdir):
    return [n for n in paths.listdir(checkpoint.checkpoint_dir(workdir)) if "corrupt" in n]


def _array_files(step_dir):
    """The array data files of a checkpoint step (what a lost object would be)."""
    return [f for f in paths.walk_files(step_dir)
            if "/d/" in os.fspath(f) and "/params/" in os.fspath(f)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """An uninterrupted run with `--workdir runs/ref` typed from another directory."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    code, out = train_cli.finish(train_cli.start(_args("runs/ref", data_dir), cwd=str(cwd)))
    assert code == 0, out[-3000:]
    workdir = str(cwd / "runs" / "ref")
    assert checkpoint.finalized_steps(workdir) == [4, 8, 12]
    assert not os.path.exists(os.path.join(train_cli.REPO, "runs", "ref"))
    return {"workdir": workdir, "rows": metrics.read(workdir), "params": _params(workdir, STEPS),
            "cwd": str(cwd)}


def test_relative_workdir_resumes_and_refuses_a_changed_batch(reference, data_dir):
    cwd = reference["cwd"]
    # Resuming a finished run is a no-op that leaves its config.json as trained.
    before = open(os.path.join(reference["workdir"], "config.json")).read()
    code, out = train_cli.finish(train_cli.start(
        _args("runs/ref", data_dir, "--config.train.log_every=3"), cwd=cwd))
    assert code == 0 and "already at step 12" in out, out[-2000:]
    assert open(os.path.join(reference["workdir"], "config.json")).read() == before
    # Another global batch would silently be another run: refused, naming the key.
    code, out = train_cli.finish(train_cli.start(
        _args("runs/ref", data_dir, "--config.data.batch_size=8", steps=16), cwd=cwd))
    assert code == 2 and "config.data.batch_size" in out, out[-2000:]
    assert checkpoint.finalized_steps(reference["workdir"]) == [4, 8, 12]
    assert open(os.path.join(reference["workdir"], "config.json")).read() == before


def test_gcs_workdir_sigkill_and_resume_is_exact(reference, data_dir, gcs_env, tmp_path):
    """The run lives on the bucket only: killed between checkpoints, resumed, exact."""
    gcs = gcs_env  # this process reads the bucket too (metrics, params)
    workdir = f"gs://{BUCKET}/sigkill/run"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = train_cli.start(_args(workdir, data_dir), cwd=str(cwd), extra_env=gcs.env())

    mirror = str(gcs.object_path("sigkill/run"))  # the server's own files: fast to poll

    def past_a_checkpoint():
        ckpts = os.path.join(mirror, "checkpoints")
        steps = sorted(int(n) for n in (os.listdir(ckpts) if os.path.isdir(ckpts) else [])
                       if os.path.exists(os.path.join(ckpts, n, "commit_success.txt")))
        try:
            rows = metrics.read(mirror) if os.path.isdir(mirror) else []
        except ValueError:  # a part file being rewritten
            return False
        return steps and rows and rows[-1]["step"] > steps[-1]

    train_cli.wait_for(proc, past_a_checkpoint, "a row past a checkpoint")
    proc.send_signal(signal.SIGKILL)
    train_cli.finish(proc)
    last_good = checkpoint.finalized_steps(workdir)[-1]
    code, out = train_cli.finish(train_cli.start(_args(workdir, data_dir), cwd=str(cwd),
                                                 extra_env=gcs.env()))
    assert code == 0, out[-3000:]
    assert f"resumed from step {last_good}" in out
    _assert_same_run(workdir, reference)
    assert not list(cwd.iterdir()), "the run wrote to the local disk"
    names = gcs.objects("sigkill/run/")
    assert "sigkill/run/config.json" in names
    assert any(n.startswith("sigkill/run/tb/") and "tfevents" in n for n in names)

    # A lost array object is corruption: that checkpoint is moved aside, the previous one
    # resumes, and the run ends exactly where the uninterrupted one did.
    for f in _array_files(checkpoint.step_dir(workdir, STEPS)):
        f.unlink()
    code, out = train_cli.finish(train_cli.start(_args(workdir, data_dir), cwd=str(cwd),
                                                 extra_env=gcs.env()))
    assert code == 0, out[-3000:]
    assert "resumed from step 8" in out and "is corrupt" in out, out[-3000:]
    assert _corrupt_dirs(workdir) == ["12.corrupt-0"]
    _assert_same_run(workdir, reference)


def test_every_checkpoint_corrupt_starts_fresh_exactly(reference, data_dir, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(reference["workdir"], workdir)
    for step in checkpoint.finalized_steps(workdir):
        for f in _array_files(checkpoint.step_dir(workdir, step)):
            f.unlink()
    code, out = train_cli.finish(train_cli.start(_args(workdir, data_dir)))
    assert code == 0, out[-3000:]
    assert "resumed" not in out
    assert sorted(_corrupt_dirs(workdir)) == ["12.corrupt-0", "4.corrupt-0", "8.corrupt-0"]
    _assert_same_run(workdir, reference)  # the data iterator started anew, too


def test_unreadable_checkpoint_stops_and_moves_nothing(reference, data_dir, tmp_path):
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("root without setpriv: permissions cannot be taken away")
    workdir = str(tmp_path / "w")
    shutil.copytree(reference["workdir"], workdir)
    victim = _array_files(checkpoint.step_dir(workdir, STEPS))[0]
    os.chmod(victim, 0)
    rows_before = open(os.path.join(workdir, "metrics.jsonl")).read()
    # As root, drop the capabilities that let root read any file.
    prefix = (["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
              if os.geteuid() == 0 else [])
    code, out = train_cli.finish(train_cli.start(_args(workdir, data_dir, steps=16),
                                                 prefix=prefix))
    assert code != 0, out[-3000:]
    assert checkpoint.step_dir(workdir, STEPS) in out and "nothing was moved" in out, out[-3000:]
    assert "Traceback" not in out
    assert checkpoint.finalized_steps(workdir) == [4, 8, 12] and not _corrupt_dirs(workdir)
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == rows_before


def test_changed_data_workers_resumes_and_keeps_every_checkpoint(reference, data_dir,
                                                                  tmp_path):
    """The sample order does not depend on the decode workers: 0 → 2 workers resumes."""
    workdir = str(tmp_path / "w")
    shutil.copytree(reference["workdir"], workdir)
    code, out = train_cli.finish(train_cli.start(
        _args(workdir, data_dir, "--config.data.workers=2", steps=16)))
    assert code == 0 and "resumed from step 12" in out, out[-3000:]
    assert checkpoint.finalized_steps(workdir)[:3] == [4, 8, 12] and not _corrupt_dirs(workdir)
    history = open(os.path.join(workdir, "config_history.jsonl")).read()
    assert '"data.workers": {"from": 0, "to": 2}' in history


@pytest.fixture
def outage_server(tmp_path):
    """A GCS server of this test's own, to stop and start again."""
    server = GcsServer(tmp_path / "outage").start()
    yield server
    server.stop()


def test_gcs_outage_during_save_and_restore_is_retried(reference, data_dir, outage_server,
                                                       tmp_path):
    server = outage_server
    workdir = f"gs://{BUCKET}/outage/run"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # 1. The server goes away for 3 s right after the first checkpoint is committed,
    # while the run goes on and saves the next ones.
    proc = train_cli.start(_args(workdir, data_dir), cwd=str(cwd), extra_env=server.env())
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
    proc = train_cli.start(_args(workdir, data_dir), cwd=str(cwd), extra_env=server.env())
    threading.Timer(3.0, server.start).start()
    code, out = train_cli.finish(proc)
    assert code == 0, out[-3000:]
    assert f"already at step {STEPS}" in out, out[-3000:]
    names = server.objects("outage/run/checkpoints/")
    assert not [n for n in names if "corrupt" in n]
    for step in (4, 8, 12):
        assert f"outage/run/checkpoints/{step}/commit_success.txt" in names
    # The server keeps each object as a file under its root: that tree is the workdir.
    _assert_same_run(str(server.object_path("outage/run")), reference)
