"""Running `clipjax train` as a user does, in a subprocess: shared by the CLI test files.

The data is a folder of real PNG files with captions and a small sentencepiece
vocabulary (gloo all-reduces CLIP's 49,408-row embedding gradient slowly, and the
trainer does not care which tokenizer it is).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from clipjax.data.tokenizers import train_sentencepiece

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600
VOCAB = 40


def make_pairs(root) -> str:
    """80 image-caption pairs in `root` and `root`_sp.model next to it; the same pairs
    as 4 webdataset shards `root`_wds/00000{0..3}.tar, each with two captions (lines)."""
    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "cat", "dog", "car", "tree", "house", "sky", "sea"]
    captions = []
    for i in range(80):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i:04d}.png")
        caption = " ".join(rng.choice(words, size=3)) + f" {i}"
        (root / f"{i:04d}.txt").write_text(caption)
        captions.append(caption)
    shards = root.parent / f"{root.name}_wds"
    shards.mkdir()
    for s in range(4):
        with tarfile.open(shards / f"{s:06d}.tar", "w") as tar:
            for i in range(s * 20, (s + 1) * 20):
                second = " ".join(rng.choice(words, size=2)) + f" {i}"
                for name, data in ((f"{i:04d}.png", (root / f"{i:04d}.png").read_bytes()),
                                   (f"{i:04d}.txt", f"{captions[i]}\n{second}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        captions.append(second)
    train_sentencepiece(captions, str(root.parent / f"{root.name}_sp"), vocab_size=VOCAB)
    return str(root)


def augmented_shards(data_dir) -> list[str]:
    """Overrides that train on the webdataset copy with augmentation on: random resized
    crop, flip and a random one of each sample's two captions."""
    return ["--config.data.train.source=webdataset",
            f"--config.data.train.urls={data_dir}_wds/{{000000..000003}}.tar",
            "--config.data.train.caption_lines=True", "--config.data.train.caption_choice=random",
            "--config.data.augment.crop_scale=(0.5,1.0)", "--config.data.augment.flip=True"]


def args(workdir, data_dir, *extra, steps: int, ckpt_every: int):
    """`clipjax train` of configs/tiny.py (one block per tower) on the pairs, no crops."""
    return [sys.executable, "-m", "clipjax", "train", "--config",
            os.path.join(REPO, "configs", "tiny.py"),
            "--workdir", str(workdir), "--progress=off",
            f"--config.train.steps={steps}", f"--config.train.ckpt_every={ckpt_every}",
            "--config.train.log_every=1", "--config.train.peak_flops=1e11",
            "--config.train.keep=2", "--config.train.keep_every=16",
            "--config.data.batch_size=16", "--config.data.train.source=folder",
            f"--config.data.train.path={data_dir}", "--config.data.augment.crop_scale=(1.0,1.0)",
            "--config.data.augment.crop_ratio=(1.0,1.0)",
            "--config.model.tokenizer.kind=sentencepiece",
            f"--config.model.tokenizer.path={data_dir}_sp.model",
            f"--config.model.text.vocab_size={VOCAB}", "--config.model.image.layers=1",
            "--config.model.text.layers=1", *extra]


# The reference run of the CLI tests (conftest's `cli_reference`).
STEPS, CKPT_EVERY = 16, 4


# FLIP patch dropout (half of the 16 patches) and an EMA of the params ride along: the
# kept patches are drawn like the crops, and the EMA is saved and restored with the state.
RECIPES = ("--config.model.image.patch_dropout=0.5", "--config.train.ema_decay=0.9")


def reference_args(workdir, data_dir, *extra, steps: int = STEPS):
    """Webdataset shards, augmentation on (crops, flips, caption and kept-patch draws all
    follow (seed, epoch, global position), whatever the process count and through
    resumes), an EMA of the params; checkpoints every 4 steps, the last two kept and
    every 8th."""
    return args(workdir, data_dir, *augmented_shards(data_dir), *RECIPES,
                "--config.train.keep_every=8", *extra, steps=steps, ckpt_every=CKPT_EVERY)


def final_params(workdir, step: int = STEPS, which: str = "raw"):
    """Params (or their EMA) restored whole onto one device, whatever topology wrote them
    (no abstract tree given: the checkpoint's own metadata, also for a 2-process one)."""
    import jax

    from clipjax import checkpoint

    return jax.tree.map(np.asarray, checkpoint.restore_params(workdir, step, which=which))


def xla_flags(devices: int | None = None) -> str:
    """The suite's XLA flags (tests/conftest.py: LLVM at optimisation level 0) with the
    device count replaced by `devices` (None: left to the caller, as cpu_mesh.sh does)."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    if devices is not None:
        kept.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(kept)


def env(devices: int = 8, extra: dict[str, str] | None = None) -> dict[str, str]:
    out = dict(os.environ)
    out["XLA_FLAGS"] = xla_flags(devices)
    out["JAX_PLATFORMS"] = "cpu"
    out["PYTHONPATH"] = REPO + os.pathsep + out.get("PYTHONPATH", "")
    out.pop("PYTEST_CURRENT_TEST", None)
    out.update(extra or {})
    return out


def start(cmd, devices: int = 8, cwd: str = REPO, extra_env=None, prefix=()):
    return subprocess.Popen([*prefix, *cmd], cwd=cwd, env=env(devices, extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout: float = TIMEOUT):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"clipjax train timed out:\n{out[-3000:]}")
    return proc.returncode, out


def local_rows(workdir) -> list[dict]:
    """The rows of a local metrics.jsonl, stopping at a line being written."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line being written
                break
    return rows


def wait_for(proc, condition, what, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            out = proc.stdout.read()
            pytest.fail(f"clipjax train exited ({proc.returncode}) before {what}:\n{out[-3000:]}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")
