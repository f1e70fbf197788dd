"""The path layer and the writers built on it, local and against a real GCS server."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

from clipjax import metrics, paths
from clipjax.errors import ClipjaxError


def test_relative_paths_resolve_against_the_directory_typed_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = paths.resolve("runs/x")
    assert os.fspath(p) == str(tmp_path / "runs" / "x")
    monkeypatch.chdir("/")
    assert os.fspath(p) == str(tmp_path / "runs" / "x")  # resolved once, not re-read
    assert paths.to_str("file:///a/b") == "/a/b"
    assert paths.to_str("gs://bucket/a/b") == "gs://bucket/a/b"
    assert paths.protocol("gs://b/x") == "gs" and not paths.is_remote("/x")


def test_a_protocol_without_its_package_names_what_to_install():
    with pytest.raises(ClipjaxError, match="s3fs"):
        paths.resolve("s3://bucket/run")
    with pytest.raises(ClipjaxError, match="empty path"):
        paths.resolve("")


def test_files_on_the_bucket_behave_like_local_ones(gcs_env):
    root = "gs://bucket1/test_paths/files"
    paths.write_text(f"{root}/a.txt", "one")
    paths.write_text(f"{root}/a.txt", "two")  # replaced whole
    paths.write_bytes(f"{root}/sub/b.bin", b"0123456789")
    assert paths.read_text(f"{root}/a.txt") == "two"
    assert paths.listdir(root) == ["a.txt", "sub"]
    assert paths.is_dir(f"{root}/sub") and paths.is_file(f"{root}/a.txt")
    assert paths.size(f"{root}/sub/b.bin") == 10
    assert paths.glob(f"{root}/*.txt") == [f"{root}/a.txt"]
    with paths.open(f"{root}/sub/b.bin", "rb") as f:
        f.seek(3)
        assert f.read(2) == b"34"
    assert sorted(os.fspath(p) for p in paths.walk_files(root)) == [
        f"{root}/a.txt", f"{root}/sub/b.bin"]
    assert paths.listdir(f"{root}/sub") == ["b.bin"]
    # Another process's write is seen at once: listings are not cached.
    subprocess.run([sys.executable, "-c", "from clipjax import paths; "
                    f"paths.write_text('{root}/sub/c.txt', 'x')"],
                   env={**os.environ, **gcs_env.env()}, check=True, timeout=120)
    assert paths.listdir(f"{root}/sub") == ["b.bin", "c.txt"]


def test_metrics_on_the_bucket_are_part_files_truncated_on_resume(gcs_env, monkeypatch):
    workdir = "gs://bucket1/test_paths/metrics"
    monkeypatch.setattr(metrics, "PART_ROWS", 4)
    w = metrics.MetricsWriter(workdir, total_steps=10, enabled=True, progress=False)
    for step in range(1, 11):
        w.write(step, {"loss": 1.0 / step})
    w.close()
    names = paths.listdir(workdir)
    assert [n for n in names if n.startswith("metrics")] == [
        "metrics-00000.jsonl", "metrics-00001.jsonl", "metrics-00002.jsonl"]
    assert [r["step"] for r in metrics.read(workdir)] == list(range(1, 11))
    # A resume from step 5 drops the rows past it (and the parts holding only those).
    w = metrics.MetricsWriter(workdir, total_steps=10, start_step=5, enabled=True,
                              progress=False)
    w.write(6, {"loss": 0.5})
    w.close()
    assert [r["step"] for r in metrics.read(workdir)] == [1, 2, 3, 4, 5, 6]
    assert "metrics-00002.jsonl" not in paths.listdir(workdir)


def _events(data: bytes) -> list:
    """TFRecord framing of an event file → Event protos (what TensorBoard reads)."""
    from tensorboardX.proto import event_pb2

    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[i + 12:i + 12 + n])
        out.append(event)
        i += 12 + n + 4
    return out


def test_tensorboard_events_on_the_bucket_are_readable(gcs_env):
    from clipjax.tensorboard import summary_writer

    logdir = "gs://bucket1/test_paths/tb"
    w = summary_writer(logdir)
    for step in range(3):
        w.add_scalar("train/loss", 1.0 + step, step)
    w.flush()
    w.close()
    (name,) = paths.listdir(logdir)
    assert "tfevents" in name
    scalars = [(e.step, v.simple_value) for e in _events(paths.read_bytes(f"{logdir}/{name}"))
               for v in e.summary.value if v.tag == "train/loss"]
    assert scalars == [(0, 1.0), (1, 2.0), (2, 3.0)]


def test_the_tensorboard_writer_does_not_import_torch(tmp_path):
    """tensorboardX imports torch when it is installed (2.7 s at every run's start) only to
    accept torch tensors; the writer is built without it, and torch still imports after."""
    pytest.importorskip("torch")
    code = ("import sys; from clipjax import tensorboard; "
            f"w = tensorboard.summary_writer({str(tmp_path)!r}); w.add_scalar('x', 1.0, 1); "
            "w.close(); assert 'torch' not in sys.modules, 'torch imported'; import torch")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path))
