"""The trainer's edges: when to start jax.distributed, the metrics files, MFU accounting."""

from __future__ import annotations

import io
import json
import math

import jax
import pytest
from ml_collections import ConfigDict

from clipjax import config as config_lib
from clipjax import metrics, runtime


def _runtime(distributed="auto", address="", n=0, pid=-1):
    return ConfigDict({"distributed": distributed, "coordinator_address": address,
                       "num_processes": n, "process_id": pid})


@pytest.fixture
def calls(monkeypatch):
    """Records jax.distributed.initialize's arguments instead of contacting a coordinator."""
    seen = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.append(kw))
    return seen


def test_distributed_auto_stays_single_process_on_a_workstation(calls):
    assert not runtime.initialize_distributed(_runtime(), environ={})
    assert not runtime.initialize_distributed(_runtime("off", "h:1", 2, 0), environ={})
    assert calls == []


def test_distributed_explicit_coordinator_is_passed_through(calls):
    assert runtime.initialize_distributed(_runtime("auto", "127.0.0.1:9999", 2, 1), environ={})
    assert calls == [{"coordinator_address": "127.0.0.1:9999", "num_processes": 2,
                      "process_id": 1}]


def test_distributed_auto_under_slurm_and_on_tpu_pods(calls):
    slurm = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_JOB_NODELIST": "gpu[1-4]"}
    assert runtime.initialize_distributed(_runtime(), environ=slurm)
    assert runtime.initialize_distributed(_runtime(), environ={"TPU_WORKER_HOSTNAMES": "a,b"})
    assert not runtime.initialize_distributed(_runtime(), environ={"TPU_WORKER_HOSTNAMES": "a"})
    assert not runtime.initialize_distributed(
        _runtime(), environ={"SLURM_NTASKS": "1", "SLURM_PROCID": "0"})
    assert calls == [{}, {}]  # JAX discovers the cluster itself
    assert runtime.initialize_distributed(_runtime("on"), environ={})


def test_metrics_writer_jsonl_truncation_and_progress_bar(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    w = metrics.MetricsWriter(workdir, total_steps=4, enabled=True, progress=False)
    for step in (1, 2, 3):
        w.write(step, {"loss": 1.0 / step, "mfu": 0.5})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # torn by a kill mid-write
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    w = metrics.MetricsWriter(workdir, total_steps=4, start_step=2, enabled=True, progress=True)
    w.advance()
    w.write(3, {"loss": 0.25, "images_per_sec": 10.0})
    w.close()
    rows = metrics.read(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] == 0.25
    assert "3/4" in stderr.getvalue()  # the bar resumed at step 2 and advanced
    assert (tmp_path / "tb").is_dir()
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["mfu"] == 0.5


def test_model_flops_count_frozen_towers_forward_only():
    from clipjax.models import flops

    c = config_lib.default_config()
    c.data.batch_size = 8
    fwd = flops.forward_flops(c.model)
    both = metrics.model_flops_per_step(c)
    lit = metrics.model_flops_per_step(c, frozen_towers=("image",))
    assert both - lit == pytest.approx(2 * fwd["image"] * 8)
    assert both > 3 * fwd["total"] * 8  # plus the logits


def test_peak_flops_on_cpu_is_per_process():
    devices = jax.devices()
    assert len(devices) == 8
    assert metrics.peak_flops_total(1e9, devices) == 1e9 * jax.process_count()
    measured = metrics.measure_peak_flops(seconds=0.05)
    assert 1e8 < measured < 1e14 and math.isfinite(measured)


def test_compilation_cache_key_points_jax_at_the_resolved_directory(tmp_path, monkeypatch):
    import jax

    from clipjax import runtime

    before = jax.config.jax_compilation_cache_dir
    monkeypatch.chdir(tmp_path)
    try:
        runtime.use_compilation_cache("cache/jax")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache" / "jax")
        runtime.use_compilation_cache("")  # off: JAX's own setting stays
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache" / "jax")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_remote_shards_get_the_runs_index_cache_unless_one_is_set(repo_root):
    from clipjax.train import loop

    config = config_lib.load(str(repo_root / "configs" / "tiny.py"), [
        "--config.data.train.source=webdataset",
        "--config.data.train.urls=gs://b/shards/{000000..000003}.tar"])
    out = loop._pipeline_config(config, "gs://b/runs/x")
    assert out.data.index_cache == "gs://b/runs/x/index_cache"
    assert config.data.index_cache == ""  # config.json keeps what the user gave
    config.data.index_cache = "/cache"
    assert loop._pipeline_config(config, "gs://b/runs/x").data.index_cache == "/cache"
    config.data.index_cache = ""
    config.data.train.urls = "/local/{000000..000003}.tar"
    assert loop._pipeline_config(config, "/runs/x").data.index_cache == ""
