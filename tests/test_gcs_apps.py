"""The model-using commands against a real GCS API server (fake-gcs-server), with every
path of the run in the bucket: `clipjax import` from and to the bucket, `clipjax.load`,
`clipjax export`, `clipjax eval --watch` following checkpoints as they land, and
`clipjax embed` / `clipjax search` keeping their index there.

Each CLI runs as a subprocess in an empty current directory, with HOME and TMPDIR
elsewhere; afterwards that directory must still be empty and TMPDIR hold nothing
of the run: nothing lands on local disk (e.g. a `./gs:/bucket1/...` tree).
"""

import json
import os
import struct
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
from apps_data import write_photos
from eval_data import random_params, save_tiny, tiny_config, write_idx_split
from images import png

from clipjax.cli import main

PREFIX = f"test_gcs_apps-{uuid.uuid4().hex[:8]}"
ROOT = f"gs://bucket1/{PREFIX}"
TIMEOUT = 300


@pytest.fixture(scope="module")
def bucket_env(gcs):
    """The GCS environment for this process for the whole module (module fixtures)."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in gcs.env().items():
            mp.setenv(k, v)
        yield gcs


def _clipjax(tmp_path_factory, gcs, *argv, check=True, timeout=TIMEOUT, background=False):
    """Runs `clipjax ARGV` in a fresh empty cwd (HOME, TMPDIR elsewhere); returns the
    CompletedProcess (or the Popen with `background`) and the (cwd, tmpdir) to check."""
    base = tmp_path_factory.mktemp("cli")
    cwd, home, tmp = base / "cwd", base / "home", base / "tmp"
    for d in (cwd, home, tmp):
        d.mkdir()
    env = {**os.environ, **gcs.env(), "HOME": str(home), "TMPDIR": str(tmp),
           "MPLCONFIGDIR": str(home / "mpl")}
    cmd = [sys.executable, "-m", "clipjax", *argv]
    if background:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        return proc, (cwd, tmp)
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _assert_nothing_local(cwd, tmp)
    return r


def _in_process(tmp_path_factory, capsys, *argv):
    """`clipjax ARGV` in this process (the module's GCS environment) from a fresh empty
    cwd, which must stay empty; returns stdout."""
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        capsys.readouterr()
        code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert os.listdir(cwd) == []
    return out


def _assert_nothing_local(cwd, tmp):
    assert os.listdir(cwd) == [], sorted(os.listdir(cwd))
    left = [os.path.join(r, f) for r, _, fs in os.walk(tmp) for f in fs]
    assert left == [], left


def _objects(gcs, sub: str) -> list[str]:
    """Object names under ROOT/sub, relative to it."""
    prefix = f"{PREFIX}/{sub}/"
    return [o[len(prefix):] for o in gcs.objects(prefix)]


@pytest.fixture(scope="module")
def source(bucket_env):
    """A tiny open_clip .safetensors and its model-config JSON in the bucket (written by
    the exporter from random params: no torch needed)."""
    from clipjax.interop.export import write_open_clip

    config = tiny_config()
    params = random_params(config.model, seed=3)
    write_open_clip(params, config.model, f"{ROOT}/src/model.safetensors",
                    model_config_out=f"{ROOT}/src/clipjax-tiny.json")
    return params, config


@pytest.fixture(scope="module")
def imported(tmp_path_factory, gcs, source):
    """`clipjax import` from the bucket to the bucket (one imported model per module)."""
    workdir = f"{ROOT}/run"
    r = _clipjax(tmp_path_factory, gcs, "import", "open_clip",
                 "--model-config", f"{ROOT}/src/clipjax-tiny.json",
                 "--checkpoint", f"{ROOT}/src/model.safetensors", "--workdir", workdir)
    return workdir, r


def test_import_to_bucket(imported, gcs):
    workdir, r = imported
    assert f"-> {workdir}/checkpoints/0" in r.stdout
    names = _objects(gcs, "run")
    assert "config.json" in names
    assert any(n.startswith("checkpoints/0/params/") for n in names), names
    assert any(n.startswith("checkpoints/0/metadata") for n in names), names
    meta = json.loads(gcs.object_path(f"{PREFIX}/run/checkpoints/0/metadata/metadata")
                      .read_text())
    assert meta["checkpoint"] == f"{ROOT}/src/model.safetensors"


def test_load_from_bucket(imported, source, bucket_env):
    import clipjax
    from clipjax.inference import ClipModel

    workdir, _ = imported
    params, _ = source
    model = clipjax.load(workdir)
    assert (model.workdir, model.step) == (workdir, 0)
    same = clipjax.load(f"{workdir}/checkpoints/0")
    assert (same.workdir, same.step) == (workdir, 0)
    texts = ["a photo of a cat", "a diagram"]
    want = ClipModel.from_params(model.config, params).encode_texts(texts)
    np.testing.assert_allclose(model.encode_texts(texts), want, atol=1e-6)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (2, 24, 20, 3), dtype=np.uint8)
    np.testing.assert_allclose(model.encode_images(images),
                               ClipModel.from_params(model.config, params).encode_images(images),
                               atol=1e-6)


def test_export_to_bucket(imported, tmp_path_factory, gcs, bucket_env, capsys):
    from safetensors.numpy import load

    workdir, _ = imported
    r = _clipjax(tmp_path_factory, gcs, "export", "open_clip", "--workdir", workdir,
                 "--out", f"{ROOT}/export/model.safetensors",
                 "--model-config-out", f"{ROOT}/export/clipjax-tiny.json")
    assert f"wrote {ROOT}/export/model.safetensors" in r.stdout
    out = _in_process(tmp_path_factory, capsys, "export", "open_clip", "--workdir", workdir,
                      "--out", f"{ROOT}/export/dir")
    assert f"local-dir:{ROOT}/export/dir" in out
    assert _objects(gcs, "export") == ["clipjax-tiny.json", "dir/open_clip_config.json",
                                       "dir/open_clip_model.safetensors", "model.safetensors"]
    # import (from the bucket) -> export (to the bucket) gives the source tensors exactly.
    src = load(gcs.object_path(f"{PREFIX}/src/model.safetensors").read_bytes())
    for name in ("model.safetensors", "dir/open_clip_model.safetensors"):
        out = load(gcs.object_path(f"{PREFIX}/export/{name}").read_bytes())
        assert sorted(out) == sorted(src)
        for k in src:
            np.testing.assert_array_equal(out[k], src[k], err_msg=k)
    assert json.loads(gcs.object_path(f"{PREFIX}/export/clipjax-tiny.json").read_text()) == \
        json.loads(gcs.object_path(f"{PREFIX}/src/clipjax-tiny.json").read_text())


def _tb_scalars(data: bytes) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from a TensorBoard event file's bytes (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    out, pos = {}, 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
        pos += 12 + n + 4
        for v in event.summary.value:
            out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_eval_watch_follows_a_run_in_the_bucket(tmp_path_factory, gcs, bucket_env):
    from clipjax import paths

    # The eval data and class names live in the bucket too.
    local = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    write_idx_split(str(local), "test", rng.integers(0, 255, (12, 20, 20), dtype=np.uint8),
                    rng.integers(0, 3, 12, dtype=np.uint8))
    for name in os.listdir(local):
        paths.write_bytes(f"{ROOT}/idx/{name}", (local / name).read_bytes())
    paths.write_text(f"{ROOT}/idx/names.txt", "circle\nsquare\ntriangle\n")

    workdir = f"{ROOT}/watched"
    config = tiny_config(train_steps=20)
    # Started before the run exists: it waits for config.json, then follows checkpoints/.
    proc, (cwd, tmp) = _clipjax(
        tmp_path_factory, gcs, "eval", "--workdir", workdir, "--watch", "--checkpoint", "all",
        "--poll-interval", "0.5", "--watch-timeout", "120", "--tasks",
        f"shapes=idx:{ROOT}/idx", "--classnames", f"{ROOT}/idx/names.txt", "--batch-size", "8",
        "--no-progress", background=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("waiting for" in x for x in lines) and time.monotonic() < deadline \
                and proc.poll() is None:
            time.sleep(0.1)
        assert any(f"waiting for {workdir}/config.json" in x for x in lines), lines
        save_tiny(workdir, 10, config)
        deadline = time.monotonic() + 120
        while ("eval/shapes/10.json" not in _objects(gcs, "watched")
               and time.monotonic() < deadline and proc.poll() is None):
            time.sleep(0.2)
        assert "eval/shapes/10.json" in _objects(gcs, "watched"), proc.poll()
        save_tiny(workdir, 20, config)  # the run's final step: the evaluator stops after it
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    out = "".join(lines)
    assert proc.returncode == 0, out[-3000:]
    assert "step 20 is the run's last" in out, out[-3000:]
    _assert_nothing_local(cwd, tmp)

    names = _objects(gcs, "watched")
    for step in (10, 20):
        rec = json.loads(gcs.object_path(f"{PREFIX}/watched/eval/shapes/{step}.json")
                         .read_text())
        assert rec["step"] == step and rec["num_examples"] == 12 and rec["num_classes"] == 3
        assert any(n.startswith(f"eval/cache/shapes/{step}-") and n.endswith(".npy")
                   for n in names), names
    assert "eval/shapes/top1.png" in names
    png = gcs.object_path(f"{PREFIX}/watched/eval/shapes/top1.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    events = [n for n in names if n.startswith("tb/eval/") and "tfevents" in n]
    assert events, names
    scalars = {}
    for n in events:
        scalars.update(_tb_scalars(gcs.object_path(f"{PREFIX}/watched/{n}").read_bytes()))
    assert [s for s, _ in scalars["shapes/top1"]] == [10, 20]
    # The evaluator wrote nothing into checkpoints/ beyond what the run saved.
    assert not any(n.startswith("checkpoints/") and "eval" in n for n in names)


def test_embed_and_search_keep_the_index_in_the_bucket(imported, tmp_path_factory, gcs,
                                                       bucket_env, capsys):
    workdir, _ = imported
    photos_dir = tmp_path_factory.mktemp("photos")
    photos = write_photos(str(photos_dir))
    index = f"{ROOT}/index"
    r = _clipjax(tmp_path_factory, gcs, "embed", "--model", workdir, "--images",
                 str(photos_dir), "--out", index, "--approximate", "ivf", "--json",
                 "--no-progress")
    summary = json.loads(r.stdout)
    assert summary["index"] == index and summary["embedded"] == summary["count"] == len(photos)
    assert _objects(gcs, "index") == ["embeddings.npy", "files.json", "ivf.faiss", "ivf.json",
                                      "meta.json"]
    meta = json.loads(gcs.object_path(f"{PREFIX}/index/meta.json").read_text())
    assert meta["model"]["workdir"] == workdir
    ivf_before = gcs.object_path(f"{PREFIX}/index/ivf.faiss").stat().st_mtime_ns

    # Incremental on the bucket: a re-run (the cache remembers the model) embeds nothing.
    again = json.loads(_in_process(tmp_path_factory, capsys, "embed", "--images",
                                   str(photos_dir), "--out", index, "--json", "--no-progress"))
    assert again["embedded"] == 0 and again["unchanged"] == len(photos)

    r = _clipjax(tmp_path_factory, gcs, "search", "--index", index, "--image", photos[0],
                 "--k", "3", "--json", "--approximate",
                 "--contact-sheet", f"{ROOT}/sheets/hits.png")
    hits = json.loads(r.stdout)
    assert hits[0]["path"] == photos[0] and hits[0]["score"] == pytest.approx(1.0, abs=1e-2)
    assert gcs.object_path(f"{PREFIX}/sheets/hits.png").read_bytes()[:4] == b"\x89PNG"
    # The saved ivf index of this cache revision was loaded, not rebuilt and re-uploaded.
    assert gcs.object_path(f"{PREFIX}/index/ivf.faiss").stat().st_mtime_ns == ivf_before
    hits = json.loads(_in_process(tmp_path_factory, capsys, "search", "--index", index,
                                  "--query", "a cat", "--k", "4", "--json"))
    assert len(hits) == 4


def test_remote_images_are_refused_clearly(imported, gcs, bucket_env, capsys):
    workdir, _ = imported
    for argv in (["embed", "--model", workdir, "--images", f"{ROOT}/photos",
                  "--out", f"{ROOT}/index2"],
                 ["classify", "--model", workdir, "--labels", "a,b", f"{ROOT}/photos/x.jpg"],
                 ["calibrate", "--model", workdir, "--labels", "a,b", "--folder",
                  f"{ROOT}/photos"]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert f"{ROOT}/photos" in err and "local files only" in err, err
        assert "Traceback" not in err
    assert _objects(gcs, "index2") == []


def test_weights_files_read_from_the_bucket(tmp_path, bucket_env):
    """safetensors (with BF16) and PyTorch zip files give the same state_dict from the
    bucket (read from bytes) as from local disk (memory-mapped / opened by path)."""
    import torch
    from safetensors.torch import save_file

    from clipjax import paths
    from clipjax.interop.weights_file import read_state_dict

    sd = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16),
          "c": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, str(tmp_path / "w.pt"))
    for name in ("w.safetensors", "w.pt"):
        paths.write_bytes(f"{ROOT}/weights/{name}", (tmp_path / name).read_bytes())
        local = read_state_dict(str(tmp_path / name))
        remote = read_state_dict(f"{ROOT}/weights/{name}")
        assert sorted(remote) == sorted(local) == ["a", "b", "c"]
        for k in local:
            assert remote[k].dtype == local[k].dtype, (name, k)
            np.testing.assert_array_equal(remote[k], local[k], err_msg=f"{name}:{k}")


def test_eval_sources_read_from_the_bucket(tmp_path, bucket_env):
    """Class folders, CLIP_benchmark wds shards and caption folders give the same examples
    from the bucket as from local disk."""
    import io
    import tarfile

    from clipjax import imageio, paths
    from clipjax.evaluate import tasks

    for name in ("red_fox", "blue_jay"):
        d = tmp_path / "folder" / "test" / name
        d.mkdir(parents=True)
        for i in range(3):
            (d / f"{i}.png").write_bytes(png(10 * i + len(name)))
    wds = tmp_path / "wds"
    (wds / "test").mkdir(parents=True)
    (wds / "classnames.txt").write_text("cat\ndog\n")
    (wds / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    for shard in range(2):
        with tarfile.open(wds / "test" / f"{shard}.tar", "w") as tar:
            for i in range(3):
                for ext, data in (("webp", png(i * 40 + shard)), ("cls", str(i % 2).encode())):
                    info = tarfile.TarInfo(f"s{shard}{i:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    caps = tmp_path / "caps"
    caps.mkdir()
    for i in range(2):
        (caps / f"{i}.png").write_bytes(png(i))
        (caps / f"{i}.txt").write_text(f"caption a{i}\ncaption b{i}\n")
    for r, _, files in os.walk(tmp_path):
        for f in files:
            rel = os.path.relpath(os.path.join(r, f), tmp_path)
            paths.write_bytes(f"{ROOT}/evaldata/{rel}", open(os.path.join(r, f), "rb").read())

    def examples(spec):
        task = tasks.parse(spec)
        src = tasks.load_source(task, "test")
        # Sources hand over paths or encoded bytes; the evaluator's workers decode them.
        rows = [(np.asarray(imageio.read(im) if isinstance(im, str) else imageio.decode(im))
                 .tobytes(), y) for im, y in src]
        names = tasks.classnames_for(task, src) if src.kind == "classification" else None
        return len(src), src.kind, names, rows

    for kind, sub in (("folder", "folder"), ("wds", "wds"), ("captions", "caps")):
        local = examples(f"{kind}:{tmp_path / sub}")
        remote = examples(f"{kind}:{ROOT}/evaldata/{sub}")
        assert remote == local, kind
        assert local[0] in (6, 2)


def test_init_from_a_workdir_in_the_bucket(imported, source, bucket_env):
    """`train.init_from=gs://...` (LiT's image tower from an imported model)."""
    import jax
    import jax.numpy as jnp

    from clipjax.train import warmstart

    workdir, _ = imported
    params, _ = source
    fresh = jax.tree.map(jnp.zeros_like, params)  # this run's params before the warm start
    loaded, taken = warmstart.load_initial_params(workdir, "image/.*", fresh)
    assert taken and all(k.startswith("image/") for k in taken)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded["image"]),
                 jax.tree.map(np.asarray, params["image"]))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded["text"]),
                 jax.tree.map(np.asarray, fresh["text"]))
