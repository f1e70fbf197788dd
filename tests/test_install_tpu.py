"""What `launch/tpu_pod.sh` installs on every worker, and nothing more: a fresh virtual
environment with `pip install '.[tpu]'` of the committed tree (no test extras, no
open-clip-torch, no torch) tokenizes with the vocabulary that ships in clipjax and
trains configs/tiny.py."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import train_cli
from PIL import Image

TEXT = "a photo of a cat"


def _clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTEST_CURRENT_TEST", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def _source_tree(repo_root, dest):
    """The tree tpu_pod.sh ships (`git archive HEAD`), or a copy without local junk."""
    dest.mkdir()
    if (repo_root / ".git").exists():
        archive = subprocess.run(["git", "-C", str(repo_root), "archive", "HEAD"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    else:
        shutil.copytree(repo_root, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".venv", "runs", "__pycache__", "*.egg-info", ".pytest_cache", "build"))


def _shards(root) -> str:
    from clipjax.data import convert

    folder = root / "folder"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(32):
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(
            folder / f"{i:03d}.jpg")
        (folder / f"{i:03d}.txt").write_text(f"a photo of thing {i}")
    convert.convert_source("folder", str(folder), str(root / "shards"), 16)
    return f"{root / 'shards'}/{{00000..00001}}.tar"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_fresh_tpu_extra_install_tokenizes_and_trains(repo_root, tmp_path):
    from clipjax.interop import peer

    try:  # the reference ids, computed here where the test extra installed open_clip
        want = peer.open_clip().tokenize([TEXT])[0].numpy()
    except ImportError:
        pytest.skip("open-clip-torch is not installed in the test environment")
    want = [int(t) for t in want[:int(np.argmax(want == 49407)) + 1]]

    src, venv = tmp_path / "src", tmp_path / "venv"
    _source_tree(repo_root, src)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, clipjax = str(venv / "bin" / "python"), str(venv / "bin" / "clipjax")
    t0 = time.monotonic()
    # --no-compile: no .pyc for jax and libtpu's thousands of modules (what the test does
    # not check; Python writes them on first import instead).
    r = subprocess.run([py, "-m", "pip", "install", "-q", "--no-compile", ".[tpu]"], cwd=src,
                       env=_clean_env(),
                       capture_output=True, text=True, timeout=900)
    install_s = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(f"pip install '.[tpu]' into a fresh venv: {install_s:.0f} s")
    try:
        # Only the tpu extra: libtpu and gcsfs are there, the test peers are not.
        probe = ("import importlib.util as u, json, clipjax; print(json.dumps([clipjax.__file__, "
                 "{m: u.find_spec(m) is not None for m in ('open_clip', 'torch', 'pytest', "
                 "'libtpu', 'gcsfs')}]))")
        r = subprocess.run([py, "-c", probe], cwd=tmp_path, env=_clean_env(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        where, found = json.loads(r.stdout)
        assert where.startswith(str(venv)), where  # the installed package, not the checkout
        assert found == {"open_clip": False, "torch": False, "pytest": False, "libtpu": True,
                         "gcsfs": True}

        r = subprocess.run([clipjax, "tokenizer", "encode", TEXT], cwd=tmp_path,
                           env=_clean_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert [int(t) for t in r.stdout.split()] == want

        # Two steps of configs/tiny.py on webdataset shards: the CLIP BPE tokenizer (the
        # shipped vocabulary) runs inside the training input pipeline too.
        workdir = tmp_path / "run"
        r = subprocess.run(
            [clipjax, "train", "--config", str(src / "configs" / "tiny.py"),
             "--workdir", str(workdir), "--progress=off", "--config.train.steps=2",
             "--config.train.ckpt_every=2", "--config.data.train.source=webdataset",
             f"--config.data.train.urls={_shards(tmp_path)}"],
            cwd=tmp_path, env=_clean_env(XLA_FLAGS=train_cli.xla_flags(8)),
            capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == [1, 2]
        assert all(np.isfinite(row["loss"]) for row in rows)
        assert (workdir / "checkpoints" / "2").is_dir()
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # ~2 GB
