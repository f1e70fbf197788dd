"""Training recipes: FLIP patch dropout, class-label positives, an EMA of the params, and
position embeddings resized on warm start and import.

One tiny program (patch dropout 0.5, positives=label, EMA 0.5) trains a few steps on
synthetic batches and serves the EMA, checkpoint and eval tests; the pipeline tests read
real webdataset shards; the import test resizes a random-init open_clip ViT-B-16 to 288 px
and compares with open_clip's own `resize_pos_embed`.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from eval_data import write_idx_split
from images import png

from clipjax import checkpoint, metrics, models
from clipjax import config as config_lib
from clipjax.cli import main
from clipjax.config import kept_patches
from clipjax.data.pipeline import build_train_pipeline
from clipjax.errors import ClipjaxError, ConfigError
from clipjax.models import posembed
from clipjax.train import program as program_lib
from clipjax.train import warmstart
from clipjax.train.checkpointing import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECAY = 0.5
STEPS = 3


def tiny(*overrides: str):
    return config_lib.load(os.path.join(REPO, "configs", "tiny.py"), [
        "--config.model.image.layers=1", "--config.model.text.layers=1",
        "--config.data.batch_size=16", *overrides])


RECIPE = ("--config.model.image.patch_dropout=0.5", "--config.loss.positives=label",
          f"--config.train.ema_decay={DECAY}")


# --------------------------------------------------------------------------- patch dropout


@functools.cache
def _vit():
    cfg = tiny().model
    model = models.build_model(cfg)
    params = models.init_params(cfg, jax.random.key(0))
    def encode(m, x, keep=None):
        return m.encode_image(x, keep=keep)

    fn = jax.jit(lambda p, x, k: model.apply({"params": p}, x, k, method=encode))
    full = jax.jit(lambda p, x: model.apply({"params": p}, x, method=encode))
    return cfg, params, fn, full


def test_patch_dropout_drops_patches_and_keeps_the_class_token():
    cfg, params, keep_fn, full_fn = _vit()
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    n = (32 // 8) ** 2
    everything = np.tile(np.arange(n, dtype=np.int32), (2, 1))
    np.testing.assert_allclose(keep_fn(params, images, everything), full_fn(params, images),
                               rtol=1e-5, atol=1e-6)
    keep = np.stack([np.sort(rng.permutation(n)[:8]) for _ in range(2)]).astype(np.int32)
    out = np.asarray(keep_fn(params, images, keep))
    # The order of the kept tokens does not matter (positions travel with them) ...
    np.testing.assert_allclose(keep_fn(params, images, keep[:, ::-1].copy()), out,
                               rtol=1e-5, atol=1e-6)
    # ... and what happens in a dropped patch changes nothing, unlike without dropout.
    other = images.copy()
    for i in range(2):
        dropped = sorted(set(range(n)) - set(keep[i].tolist()))[0]
        y, x = divmod(dropped, 4)
        other[i, 8 * y:8 * y + 8, 8 * x:8 * x + 8] += 5.0
    np.testing.assert_allclose(keep_fn(params, other, keep), out, rtol=1e-5, atol=1e-6)
    moved = np.asarray(full_fn(params, other)) - np.asarray(full_fn(params, images))
    assert np.abs(moved).max() > 1e-3


def test_patch_dropout_flops_count_the_kept_tokens():
    base = tiny()
    half = tiny("--config.model.image.patch_dropout=0.5")
    assert kept_patches(16, 0.5) == 8 and kept_patches(196, 0.75) == 49
    full = metrics.model_flops_per_step(base)
    dropped = metrics.model_flops_per_step(half)
    f = models.flops
    want = full - 16 * 3 * (f.image_flops(base.model) - f.image_flops(half.model, training=True))
    assert dropped == pytest.approx(want) and dropped < full
    # Evaluation and inference keep every token.
    assert f.image_flops(half.model) == f.image_flops(base.model)
    with pytest.raises(ConfigError, match="patch_dropout"):
        tiny("--config.model.image.patch_dropout=1.0")


# --------------------------------------------------------------------------- data


def _shards(root, n=24, with_cls=False):
    """Webdataset shards of `n` PNGs with labels in .json (or in .cls)."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(1)
    urls = []
    for s in range(2):
        path = os.path.join(root, f"{s:06d}.tar")
        with tarfile.open(path, "w") as tf:
            for i in range(n // 2):
                j = s * (n // 2) + i
                members = {"png": png(int(rng.integers(0, 255)), 40),
                           "txt": f"a photo of class {j % 3}".encode()}
                if with_cls:
                    members["cls"] = f"{j % 3}\n".encode()
                else:
                    members["json"] = json.dumps({"label": j % 3}).encode()
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{j:05d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        urls.append(path)
    return os.path.join(root, "{000000..000001}.tar")


def _data_config(urls, *extra):
    return tiny("--config.data.train.source=webdataset", f"--config.data.train.urls={urls}",
                "--config.data.augment.crop_scale=(0.5,1.0)", "--config.data.augment.flip=True",
                "--config.data.batch_size=8", *RECIPE[:2], *extra)


@pytest.mark.parametrize("with_cls", [False, True])
def test_labels_and_kept_patches_follow_the_global_sample_position(tmp_path, with_cls):
    urls = _shards(str(tmp_path / "wds"), with_cls=with_cls)
    config = _data_config(urls)
    one = build_train_pipeline(config, normalize=False)
    two = [build_train_pipeline(config, process_index=p, process_count=2, normalize=False)
           for p in range(2)]
    for _ in range(4):
        b = next(one)
        halves = [next(t) for t in two]
        assert b["label"].dtype == np.int32 and b["label"].shape == (8,)
        assert b["patches"].shape == (8, 8)
        assert all(len(set(r)) == 8 and list(r) == sorted(r) and r.max() < 16
                   for r in b["patches"])
        for k in ("image", "text", "label", "patches"):
            np.testing.assert_array_equal(b[k], np.concatenate([h[k] for h in halves]))
        assert set(b["label"].tolist()) <= {0, 1, 2}
    assert len({tuple(r) for r in b["patches"]}) > 1  # per-sample draws
    # Without dropout the crops, flips and captions are the same draws.
    plain = build_train_pipeline(tiny("--config.data.train.source=webdataset",
                                      f"--config.data.train.urls={urls}",
                                      "--config.data.augment.crop_scale=(0.5,1.0)",
                                      "--config.data.augment.flip=True",
                                      "--config.data.batch_size=8"), normalize=False)
    again = build_train_pipeline(config, normalize=False)
    p, a = next(plain), next(again)
    np.testing.assert_array_equal(p["image"], a["image"])
    assert "label" not in p and "patches" not in p
    for it in (one, *two, plain, again):
        it.close()


def test_samples_without_a_label_are_skipped(tmp_path):
    root = tmp_path / "nolabel"
    root.mkdir()
    with tarfile.open(root / "000000.tar", "w") as tf:
        for i in range(4):
            for ext, data in (("png", png(0, 8)), ("txt", b"x")):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    config = _data_config(str(root / "000000.tar"), "--config.data.batch_size=2")
    it = build_train_pipeline(config, epochs=1)
    with pytest.raises(StopIteration):
        next(it)
    assert it.skipped == {"no_label": 4}
    it.close()


# --------------------------------------------------------------------------- EMA


@functools.cache
def _trained():
    """STEPS steps of the recipe program: (program, state, params after each step)."""
    config = tiny(*RECIPE)
    program = program_lib.build(config)
    state = program.init()
    history = [jax.tree.map(np.asarray, jax.device_get(state.params))]
    pipeline = build_train_pipeline(config, normalize=False)
    for _ in range(STEPS):
        state, out = program.step(state, program.global_batch(next(pipeline)))
        history.append(jax.tree.map(np.asarray, jax.device_get(state.params)))
    assert np.isfinite(float(out["loss"])) and float(out["positives"]) > 1.0
    return config, program, state, history, pipeline


def test_ema_equals_a_numpy_recurrence_over_the_params():
    _, _, state, history, _ = _trained()
    want = history[0]
    for p in history[1:]:
        want = jax.tree.map(lambda e, x: DECAY * e + (1 - DECAY) * x, want, p)
    got = jax.tree.map(np.asarray, jax.device_get(state.ema))
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7), got, want)
    assert not np.allclose(got["image"]["proj"], history[-1]["image"]["proj"])


def test_gradcache_with_patch_dropout_and_labels_equals_one_big_step():
    """GradCache splits the kept-patch indices and labels with the micro-batches: the step
    equals the whole-batch step (loss and updated params)."""
    config, _, _, _, _ = _trained()
    batch = next(build_train_pipeline(config, normalize=False))
    outs = []
    for k in (1, 2):
        program = program_lib.build(tiny(*RECIPE, f"--config.train.grad_accum={k}"))
        state, m = program.step(program.init(), program.global_batch(batch))
        outs.append((float(m["loss"]), jax.tree.map(np.asarray, jax.device_get(state.ema))))
    assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 outs[0][1], outs[1][1])


@pytest.fixture(scope="module")
def ema_workdir(tmp_path_factory):
    config, program, state, _, pipeline = _trained()
    workdir = str(tmp_path_factory.mktemp("ema_run"))
    checkpoint.write_config(workdir, config)
    ckpt = Checkpointer(workdir, keep=2, keep_every=0, async_save=False)
    ckpt.save(state, pipeline)
    ckpt.close()
    return workdir


def test_ema_is_saved_restored_and_optional_on_resume(ema_workdir):
    config, program, state, _, _ = _trained()
    restored = Checkpointer(ema_workdir, keep=2, keep_every=0).restore_latest(
        program.abstract_state, build_train_pipeline(config, normalize=False))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.ema),
                 jax.device_get(state.ema))
    np.testing.assert_array_equal(
        checkpoint.restore_params(ema_workdir, STEPS, which="ema")["image"]["proj"],
        np.asarray(state.ema["image"]["proj"]))
    # The same checkpoint resumes a run with the EMA turned off ...
    off = tiny(*RECIPE[:2], "--config.train.ema_decay=0.0")
    plain = Checkpointer(ema_workdir, keep=2, keep_every=0).restore_latest(
        program_lib.build(off).abstract_state, build_train_pipeline(off, normalize=False))
    assert plain.ema is None and int(plain.step) == STEPS


def test_a_run_without_ema_resumes_with_it_on(tmp_path):
    off = tiny(*RECIPE[:2], "--config.train.ema_decay=0.0")
    program = program_lib.build(off)
    state = program.init()
    pipeline = build_train_pipeline(off, normalize=False)
    ckpt = Checkpointer(str(tmp_path), keep=2, keep_every=0, async_save=False)
    ckpt.save(state, pipeline)
    ckpt.close()
    assert not checkpoint.has_ema(str(tmp_path), 0)
    with pytest.raises(ClipjaxError, match="no EMA"):
        checkpoint.restore_params(str(tmp_path), 0, which="ema")
    on = tiny(*RECIPE)
    resumed = Checkpointer(str(tmp_path), keep=2, keep_every=0).restore_latest(
        program_lib.build(on).abstract_state, build_train_pipeline(on, normalize=False))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.ema),
                 jax.device_get(resumed.params))


def test_eval_writes_ema_and_raw_results(ema_workdir, tmp_path):
    idx = str(tmp_path / "idx")
    rng = np.random.default_rng(0)
    write_idx_split(idx, "test", rng.integers(0, 255, (12, 20, 20), dtype=np.uint8),
                    rng.integers(0, 3, 12, dtype=np.uint8))
    names = tmp_path / "names.txt"
    names.write_text("circle\nsquare\ntriangle\n")
    base = ["eval", "--workdir", ema_workdir, "--tasks", f"shapes=idx:{idx}", "--classnames",
            str(names), "--batch-size", "8", "--no-progress"]
    records = {}
    for which in ("raw", "ema"):
        assert main([*base, "--params", which]) == 0
        label = "shapes" if which == "raw" else "shapes+ema"
        with open(os.path.join(ema_workdir, "eval", label, f"{STEPS}.json")) as f:
            records[which] = json.load(f)
    assert records["raw"]["params"] == "raw" and records["ema"]["params"] == "ema"
    assert records["ema"]["num_examples"] == 12


# --------------------------------------------------------------------------- resizing


def test_resize_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    for old, new in ((4, 6), (6, 4), (14, 18)):
        pos = rng.standard_normal((old * old + 1, 8)).astype(np.float32)
        grid = torch.tensor(pos[1:]).reshape(1, old, old, 8).permute(0, 3, 1, 2)
        ref = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic",
                                              antialias=True, align_corners=False)
        ref = ref.permute(0, 2, 3, 1).reshape(new * new, 8).numpy()
        got = posembed.resize_image_positions(pos, new)
        np.testing.assert_array_equal(got[0], pos[0])
        np.testing.assert_allclose(got[1:], ref, rtol=1e-5, atol=1e-5)
    text = rng.standard_normal((16, 8)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.tensor(text.T[None]), size=24, mode="linear",
                                          align_corners=False)[0].T.numpy()
    np.testing.assert_allclose(posembed.resize_text_positions(text, 24), ref, atol=1e-5)


def _zeros(config):
    """Params of `config` on its program's shardings (zeros: no init to compile)."""
    return jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding),
                        program_lib.build(config).abstract_state.params)


def test_init_from_resizes_position_embeddings_and_refuses_other_mismatches(ema_workdir):
    _, _, state, _, _ = _trained()
    big = tiny("--config.model.image.image_size=48", "--config.model.text.context_length=24")
    params, taken = warmstart.load_initial_params(ema_workdir, ".*", _zeros(big))
    src = jax.tree.map(np.asarray, jax.device_get(state.params))
    got = jax.tree.map(np.asarray, jax.device_get(params))
    np.testing.assert_allclose(got["image"]["positional_embedding"],
                               posembed.resize_image_positions(
                                   src["image"]["positional_embedding"], 6), rtol=1e-6)
    assert got["text"]["positional_embedding"].shape == (24, 64)
    np.testing.assert_array_equal(got["image"]["proj"], src["image"]["proj"])
    assert "image/positional_embedding" in taken
    wide = tiny("--config.model.embed_dim=16")
    with pytest.raises(ClipjaxError, match="proj"):
        warmstart.load_initial_params(ema_workdir, ".*", _zeros(wide))


def test_import_vit_b16_at_288_equals_open_clip_resize_pos_embed(tmp_path, capsys):
    from clipjax.interop import peer

    if not peer.available():
        pytest.skip("open_clip is not installed")
    oc = peer.open_clip()
    import open_clip.model as oc_model
    import torch

    from clipjax.interop.open_clip import resolve_model_config
    from clipjax.interop.state_dict import from_state_dict

    torch.manual_seed(0)
    source = oc.create_model("ViT-B-16", pretrained=None)
    sd = {k: v.detach().clone() for k, v in source.state_dict().items()}
    target = oc.create_model("ViT-B-16", pretrained=None, force_image_size=288).eval()
    theirs = dict(sd)
    oc_model.resize_pos_embed(theirs, target)
    target.load_state_dict(theirs)
    cfg = resolve_model_config("ViT-B-16")
    cfg.image.image_size = 288
    lines = []
    params = from_state_dict({k: v.numpy() for k, v in sd.items()}, cfg, lines)
    assert lines == ["image/positional_embedding: patch grid 14x14 -> 18x18 (bicubic, "
                     "class token kept)"]
    images = torch.randn(1, 3, 288, 288, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = target.encode_image(images, normalize=True).numpy()
    model = models.build_model(cfg)
    ours = np.asarray(jax.jit(lambda p, x: model.apply(
        {"params": p}, x, method=lambda m, x: m.encode_image(x)))(
        params, jnp.asarray(images.numpy().transpose(0, 2, 3, 1))))
    assert float(np.linalg.norm(ours - ref) / np.linalg.norm(ref)) <= 1e-5
