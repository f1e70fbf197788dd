"""Launchers: SLURM environment parsing, the TPU pod script's gcloud commands, topologies."""

import os
import subprocess
import sys

import pytest

from clipjax import cluster, topology
from clipjax.errors import ClipjaxError


def test_expand_hostlist():
    assert cluster.expand_hostlist("gpu[07-08,10],login1") == ["gpu07", "gpu08", "gpu10", "login1"]
    assert cluster.expand_hostlist("a[1-2]-ib,b") == ["a1-ib", "a2-ib", "b"]
    assert cluster.expand_hostlist("node001") == ["node001"]


def test_from_slurm_reads_rank_count_and_coordinator():
    env = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_NTASKS": "16",
           "SLURM_JOB_NODELIST": "gpu[003-004]"}
    args = cluster.from_slurm(env)
    assert args == {"coordinator_address": "gpu003:8718", "num_processes": 16, "process_id": 5}
    with pytest.raises(ClipjaxError, match="SLURM_PROCID"):
        cluster.from_slurm({"SLURM_JOB_NODELIST": "x"})


def _bash(script, args, env):
    base = {"PATH": os.environ["PATH"], "CLIPJAX_PYTHON": sys.executable, "DRY_RUN": "1"}
    return subprocess.run(["bash", script, *args], capture_output=True, text=True,
                          env={**base, **env}, timeout=60)


def test_slurm_script_builds_the_train_command(repo_root):
    env = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
           "SLURM_JOB_NODELIST": "n[1-2]"}
    args = ["configs/tiny.py", "/w", "--config.train.steps=3"]
    r = _bash(repo_root / "launch/slurm.sbatch", args, env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [
        sys.executable, "-m", "clipjax", "train", "--config", "configs/tiny.py", "--workdir", "/w",
        "--config.runtime.distributed=on", "--config.runtime.coordinator_address=n1:8483",
        "--config.runtime.num_processes=2", "--config.runtime.process_id=1",
        "--config.train.steps=3"]


def test_slurm_script_runs_other_commands_on_every_task(repo_root):
    env = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "2",
           "SLURM_JOB_NODELIST": "n[1-2]", "CLIPJAX_COMMAND": "data score"}
    args = ["--model", "/w", "--shards", "/p/{0..9}.tar", "--out", "/s"]
    r = _bash(repo_root / "launch/slurm.sbatch", args, env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [
        sys.executable, "-m", "clipjax", "data", "score", *args,
        "--config.runtime.distributed=on", "--config.runtime.coordinator_address=n1:8483",
        "--config.runtime.num_processes=2", "--config.runtime.process_id=0"]


def test_tpu_pod_script_dry_run(repo_root):
    env = {"TPU_NAME": "t1", "ZONE": "us-west4-a", "ACCELERATOR": "v5litepod-16", "SPOT": "1",
           "QUEUED": "1"}
    r = _bash(repo_root / "launch/tpu_pod.sh", ["all", "configs/tiny.py", "gs://b/r"], env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("gcloud compute tpus queued-resources create t1 --node-id=t1")
    assert "--spot" in lines[0] and "--accelerator-type=v5litepod-16" in lines[0]
    installs = [line for line in lines if "--worker=all" in line and "pip install" in line]
    assert len(installs) == 1 and ".venv/bin/pip install -q '.[tpu]'" in installs[0]
    assert installs[0].count("pip install") == 2  # pip itself, then exactly '.[tpu]'
    assert "[test]" not in installs[0] and "open-clip" not in installs[0]
    assert "clipjax train --config configs/tiny.py --workdir gs://b/r" in lines[-1]
    r = _bash(repo_root / "launch/tpu_pod.sh",
              ["clipjax", "data", "score", "--shards", "gs://b/p/{0..9}.tar"], env)
    assert r.returncode == 0, r.stderr
    assert "--worker=all" in r.stdout
    assert ".venv/bin/clipjax data score --shards gs://b/p/\\{0..9\\}.tar" in r.stdout


@pytest.mark.parametrize("name, shape, chips", [
    ("v5e-8", (2, 4), 8), ("v5e-256", (16, 16), 256), ("v5e-128", (8, 16), 128),
    ("v4-64", (2, 4, 4), 32), ("v5p-128", (4, 4, 4), 64), ("v6e-64", (8, 8), 64),
    ("v5p:4x4x12", (4, 4, 12), 192),
])
def test_topology_names(name, shape, chips):
    s = topology.parse(name)
    assert s.shape == shape and s.chips == chips
    assert topology.parse(name, num_slices=2).chips == 2 * chips


@pytest.mark.parametrize("bad", ["v7-8", "v5p-96", "v5e-12", "tpu"])
def test_bad_topology_names(bad):
    with pytest.raises(ClipjaxError, match="topology"):
        topology.parse(bad)
