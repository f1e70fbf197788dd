"""Issue 19's papercuts, one test each: MFU peaks, a quiet `import clipjax`, the open_clip
defaults recipe, eval mode detection / console line / --positives caption, the messages
(unknown key, bad workdir, unreadable checkpoint, bare --progress), exported file modes.

The subprocess ones (Ctrl-C saves, a killed data worker) are in test_train_signals.py."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from eval_data import random_params, save_tiny, tiny_config
from images import png

from clipjax import checkpoint, metrics
from clipjax import config as config_lib
from clipjax.cli import command_parser, main
from clipjax.errors import ConfigError
from clipjax.evaluate import results, retrieval, tasks

TINY = "configs/tiny.py"


@pytest.fixture
def in_repo(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)


# --------------------------------------------------------------------------- 1. MFU


def test_mfu_above_one_warns_naming_the_peak_and_remeasures(caplog):
    peak = metrics.Peak(1e9, "an injected low peak", 1, measured=True,
                        remeasure=lambda: 4e9)
    with caplog.at_level(logging.WARNING, logger="clipjax.train"):
        assert peak.mfu(2e9, 1.0) == pytest.approx(2.0)
        assert peak.mfu(2e9, 1.0) == pytest.approx(0.5)  # measured again: 4e9 now
    warnings = [r.getMessage() for r in caplog.records if "MFU" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "2.000 > 1" in warnings[0] and "an injected low peak" in warnings[0]
    assert "train.peak_flops" in warnings[0]


def test_known_chip_peaks_need_no_measurement(monkeypatch):
    expect = {("TPU v4", "bfloat16"): 275e12, ("TPU v5 lite", "bfloat16"): 197e12,
              ("TPU v5p", "float32"): 459e12, ("TPU v5", "bfloat16"): 459e12,
              ("TPU v6 lite", "bfloat16"): 918e12, ("NVIDIA A100-SXM4-80GB", "float32"): 156e12,
              ("NVIDIA A100-SXM4-40GB", "bfloat16"): 312e12,
              ("NVIDIA H100 80GB HBM3", "bfloat16"): 989e12,
              ("NVIDIA H100 PCIe", "bfloat16"): 756e12, ("NVIDIA H200", "float32"): 494.7e12,
              ("NVIDIA H200", "float16"): 989e12, ("cpu", "float32"): None}
    for (kind, dtype), flops in expect.items():
        assert metrics.known_peak_flops(kind, dtype) == flops, (kind, dtype)
    # On CPU: the config's value when given, else a measured matmul (per process).
    import jax

    given = metrics.peak(2e11, "float32")
    assert given.total == 2e11 * jax.process_count() and "train.peak_flops" in given.source
    # (the matmul itself is timed in test_train_runtime; here only which peak is chosen)
    monkeypatch.setattr(metrics, "measure_peak_flops", lambda **kw: 3e9)
    measured = metrics.peak(0.0, "float32")
    assert measured.measured and measured.total == 3e9 * jax.process_count()
    assert "matmul measured on cpu" in measured.describe()


# --------------------------------------------------------------------------- 2. quiet import


def test_import_and_load_print_nothing_on_a_cpu_machine(tmp_path, repo_root):
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu (the tpu extra) is not installed: nothing would print")
    workdir = str(tmp_path / "model")
    save_tiny(workdir, 0)
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env["PYTHONPATH"] = str(repo_root)
    code = (f"import clipjax; m = clipjax.load({workdir!r}); "
            "print(m.encode_texts(['a cat']).shape)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 16)"
    assert out.stderr == "", out.stderr


def test_cpu_pin_leaves_a_users_platform_alone(monkeypatch):
    from clipjax import runtime

    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    runtime.pin_cpu_when_no_accelerator()
    assert os.environ["JAX_PLATFORMS"] == "cuda"


# --------------------------------------------------------------------------- 3. open_clip


@pytest.mark.parametrize("model", ["RN50", "ViT-B-32"])
def test_open_clip_defaults_recipe_equals_open_clip_train(model):
    from open_clip_train import params, scheduler

    from clipjax import optim
    from clipjax.train.recipes import open_clip_defaults

    args = params.parse_args([] if model == "RN50" else ["--model", model])
    assert args.model == model
    c = config_lib.validate(open_clip_defaults(model))
    assert c.optim.name == args.opt == "adamw"
    assert c.optim.lr == args.lr
    assert (c.optim.b1, c.optim.b2, c.optim.eps) == (args.beta1, args.beta2, args.eps)
    assert c.optim.weight_decay == args.wd
    assert c.optim.warmup_steps == args.warmup
    assert c.optim.schedule == args.lr_scheduler == "cosine"
    assert not args.skip_scheduler
    assert c.optim.end_lr == args.lr_cooldown_end
    assert args.grad_clip_norm is None and c.optim.clip_norm == 0.0
    assert c.train.grad_accum == args.accum_freq
    assert c.train.seed == args.seed
    assert c.data.batch_size == args.batch_size  # one GPU
    assert c.loss.logit_scale_max == pytest.approx(np.log(100))

    # The learning rate at every step: open_clip's own scheduler against optax's.
    steps = 25_000

    class Optimizer:  # what open_clip's scheduler writes the lr into
        param_groups = [{}]

    theirs = scheduler.cosine_lr(Optimizer, args.lr, args.warmup, steps)
    ours = optim.schedule(c.optim, steps)
    for step in (0, 1, 2, 4999, args.warmup - 1, args.warmup, args.warmup + 1, 17_500,
                 steps - 1):
        assert float(ours(step)) == pytest.approx(theirs(step), rel=1e-5, abs=1e-10), step


@pytest.mark.parametrize("preset", ["tiny-vit", "tiny-rn"])
def test_open_clip_defaults_decay_the_params_open_clip_decays(preset):
    """open_clip's rule (main.py: no decay when ndim < 2 or the name holds bn/ln/bias/
    logit_scale) on its own names equals the recipe's mask carried through the export map."""
    from clipjax import optim
    from clipjax.interop.open_clip import to_open_clip_state_dict
    from clipjax.models import presets
    from clipjax.train.recipes import open_clip_defaults

    c = open_clip_defaults()
    c.model = presets.model_config(preset)
    params = random_params(c.model)
    mask = optim.decay_mask(params, c.optim.no_decay)
    import jax

    marked = jax.tree.map(lambda p, m: np.full(p.shape, 1.0 if m else 0.0, np.float32),
                          params, mask)
    exported = to_open_clip_state_dict(marked, c.model)

    def open_clip_excludes(name, value):
        return (value.ndim < 2 or "bn" in name or "ln" in name or "bias" in name
                or "logit_scale" in name)

    checked = 0
    for name, value in exported.items():
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # buffers, not parameters
        assert np.all(value == value.flat[0]), name  # one mask value per tensor
        assert bool(value.flat[0]) == (not open_clip_excludes(name, value)), name
        checked += 1
    assert checked > 10
    assert bool(exported["token_embedding.weight"].flat[0])  # decayed, unlike clipjax's default
    default_mask = optim.decay_mask(params, config_lib.default_config().optim.no_decay)
    assert not default_mask["text"]["token_embedding"]


# --------------------------------------------------------------------------- 4. eval


def _wds_with_repeated_captions(root) -> str:
    """CLIP_benchmark's wds layout with captions (.txt) and no .cls: images 0 and 1 share
    their caption."""
    (root / "test").mkdir(parents=True)
    captions = ["a red square", "a red square", "a blue circle", "a green field",
                "a dark night", "a dark night"]
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i, caption in enumerate(captions):
            for ext, data in (("png", png(i * 40)), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(root)


def test_wds_mode_from_the_data_every_metric_printed_and_caption_positives(tmp_path, capsys):
    data = _wds_with_repeated_captions(tmp_path / "wds")
    assert tasks.parse(f"wds:{data}").mode == tasks.AUTO
    assert tasks.parse(f"wds:{data}@zeroshot").mode == "zeroshot"
    workdir = str(tmp_path / "model")
    save_tiny(workdir, 0)
    code = main(["eval", "--workdir", workdir, "--tasks", f"set=wds:{data}",
                 "--positives", "caption", "--no-progress", "--batch-size", "8"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "task set: the samples carry captions and no class labels: retrieval" in out
    record = json.load(open(results.result_path(workdir, "set", 0)))
    assert record["mode"] == "retrieval" and record["num_texts"] == 6
    summary = [line for line in out.splitlines() if line.startswith("step 0 set:")]
    assert len(summary) == 1
    names = results.metric_names(record)
    assert "image_to_text_R@10" in names and "text_to_image_R@1_caption" in names
    for name in names:
        assert f"{name} {100 * record[name]:.2f}%" in summary[0], name
    for name in names:
        if name.endswith("_caption"):  # more positives: never fewer hits
            assert record[name] >= record[name.removesuffix("_caption")]


def test_caption_positives_count_identical_captions():
    dog, cat = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    near_dog = np.array([0.9, 0.1]) / np.linalg.norm([0.9, 0.1])
    images = np.stack([dog, near_dog, cat])
    texts = np.stack([dog, dog, cat])  # captions "dog", "dog", "cat" of images 0, 1, 2
    groups = retrieval.caption_groups(["dog", "dog ", "cat"])
    assert groups.tolist() == [0, 0, 1]
    r = retrieval.recall_at_k(images, texts, [0, 1, 2], ks=(1,), groups=groups)
    # Image 1's own caption ties with caption 0 (lower index first): a miss at 1, but
    # caption 0 is identical. Caption 1 ranks image 0 first: the same.
    assert r["image_to_text_R@1"] == pytest.approx(2 / 3)
    assert r["text_to_image_R@1"] == pytest.approx(2 / 3)
    assert r["image_to_text_R@1_caption"] == 1.0
    assert r["text_to_image_R@1_caption"] == 1.0


# --------------------------------------------------------------------------- 7. messages


def test_unknown_key_names_it_and_suggests(in_repo, capsys):
    with pytest.raises(ConfigError) as e:
        config_lib.load(TINY, ["--config.optim.lrr=1"])
    assert str(e.value) == "unknown config key config.optim.lrr (did you mean config.optim.lr?)"
    assert e.value.key == "optim.lrr"
    code = main(["train", "--config", TINY, "--workdir", "unused", "--config.nosuch=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "clipjax train: error: unknown config key config.nosuch"
    code = main(["train", "--config", TINY, "--workdir", "unused", "--config.lr=1"])
    assert "(did you mean config.optim.lr?)" in capsys.readouterr().err


def test_bad_workdir_is_one_line(in_repo, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for workdir, words in ((a_file, "is a file, not a directory"),
                           (a_file / "run", "cannot create it: Not a directory")):
        code = main(["train", "--config", TINY, "--workdir", str(workdir)])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1, err
        assert err.startswith(f"clipjax train: error: --workdir {workdir}: {words}"), err
    if os.geteuid() == 0:
        read_only = "/sys/kernel"  # a directory even root cannot write in
    else:
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o555)
    code = main(["train", "--config", TINY, "--workdir", str(read_only)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert f"--workdir {read_only}: cannot write in it" in err


def test_unreadable_checkpoint_names_the_file_and_a_good_step(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    save_tiny(workdir, 1)
    save_tiny(workdir, 2)
    params = os.path.join(checkpoint.step_dir(workdir, 2), "params")
    for root, _, files in os.walk(params):
        for f in files:
            if os.path.basename(root) == "d":  # the array data files
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.truncate(10)
    code = main(["eval", "--workdir", workdir, "--tasks", "fashion_mnist", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert "TensorStore(" not in err and params in err
    assert err.rstrip().endswith("evaluate the newest good one with --step 1"), err


def test_bare_progress_flag_means_on():
    from clipjax.commands import train

    parser = command_parser("train", train)
    assert parser.parse_args(["--workdir", "w", "--progress"]).progress == "on"
    assert parser.parse_args(["--workdir", "w", "--progress", "off"]).progress == "off"
    assert parser.parse_args(["--workdir", "w"]).progress == "auto"


# --------------------------------------------------------------------------- 8. file modes


def test_exported_files_follow_the_umask(tmp_path, capsys):
    workdir = str(tmp_path / "model")
    save_tiny(workdir, 0, tiny_config())
    for umask in (0o022, 0o027):
        previous = os.umask(umask)
        try:
            out = tmp_path / f"u{umask:o}"
            assert main(["export", "open_clip", "--workdir", workdir, "--out",
                         str(out / "w.safetensors"), "--model-config-out",
                         str(out / "m.json")]) == 0
            assert main(["export", "open_clip", "--workdir", workdir, "--out",
                         str(out / "dir")]) == 0
        finally:
            os.umask(previous)
        for f in ("w.safetensors", "m.json", "dir/open_clip_model.safetensors",
                  "dir/open_clip_config.json"):
            assert os.stat(out / f).st_mode & 0o777 == 0o666 & ~umask, (f, oct(umask))
    capsys.readouterr()
