"""CLIP_benchmark's numbers, two ways: its own exporter writes Fashion-MNIST test images as
webdatasets, and the same tiny open_clip weights (random init, then trained a few steps in
tests/clip_benchmark_peer.py) are scored by `clip_benchmark eval` (its CLI, in a
subprocess with the exporter, `--model_type open_clip`) and by `clipjax import open_clip` +
`clipjax eval --tasks wds:DIR`. Zero-shot top-1 and mean per-class recall, and retrieval
R@1/5/10 both ways, agree within 0.1 percentage points.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from clipjax.interop import peer

FASHION = "/usr/share/datasets/fashion-mnist"
N_CLS, N_RET, STEPS = 500, 200, 40
HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, "clip_benchmark_peer.py")

if not (peer.available() and importlib.util.find_spec("clip_benchmark")):  # pragma: no cover
    pytest.skip("needs the peers the Makefile installs (open-clip-torch, clip-benchmark)",
                allow_module_level=True)
if not os.path.exists(os.path.join(FASHION, "t10k-images-idx3-ubyte.gz")):  # pragma: no cover
    pytest.skip("needs Debian's dataset-fashion-mnist (make venv installs it)",
                allow_module_level=True)


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONWARNINGS="ignore")
    env.pop("XLA_FLAGS", None)
    return env


def _clip_benchmark(tmp, dataset: str) -> dict:
    return json.loads((tmp / f"cb_{dataset}.json").read_text())["metrics"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clip_benchmark")
    proc = subprocess.run(
        [sys.executable, PEER, str(tmp), FASHION,
         str(N_CLS), str(N_RET), str(STEPS)],
        env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


@pytest.mark.timeout(600)
def test_clip_benchmark_numbers(exported, capsys):
    from clipjax.cli import main

    tmp = exported
    # The exporter's files, as CLIP_benchmark publishes them.
    assert (tmp / "wds" / "fmnist" / "classnames.txt").read_text().splitlines()[0] == \
        "T-shirt/top"
    assert (tmp / "wds" / "fmnist_captions" / "dataset_type.txt").read_text().strip() == \
        "retrieval"
    ref_cls = _clip_benchmark(tmp, "fmnist")
    ref_ret = _clip_benchmark(tmp, "fmnist_captions")

    workdir = tmp / "imported"
    if workdir.exists():
        shutil.rmtree(workdir)
    model_cfg = json.loads((tmp / "model" / "open_clip_config.json").read_text())["model_cfg"]
    assert main(["import", "open_clip", "--model-config", json.dumps(model_cfg),
                 "--checkpoint", str(tmp / "model" / "open_clip_model.safetensors"),
                 "--workdir", str(workdir)]) == 0
    tasks = (f"fmnist=wds:{tmp / 'wds' / 'fmnist'},"
             f"fmnist_captions=wds:{tmp / 'wds' / 'fmnist_captions'}@retrieval")
    assert main(["eval", "--workdir", str(workdir), "--tasks", tasks, "--batch-size", "256",
                 "--no-progress"]) == 0
    cls = json.loads(next((workdir / "eval" / "fmnist").glob("*.json")).read_text())
    ret = json.loads(next((workdir / "eval" / "fmnist_captions").glob("*.json")).read_text())
    assert cls["num_examples"] == N_CLS and ret["num_examples"] == N_RET
    assert ret["num_texts"] == 5 * N_RET

    pairs = [("top1", cls["top1"], ref_cls["acc1"]),
             ("mean_per_class_recall", cls["mean_per_class_recall"],
              ref_cls["mean_per_class_recall"])]
    for k in (1, 5, 10):
        pairs += [(f"image_to_text_R@{k}", ret[f"image_to_text_R@{k}"],
                   ref_ret[f"text_retrieval_recall@{k}"]),
                  (f"text_to_image_R@{k}", ret[f"text_to_image_R@{k}"],
                   ref_ret[f"image_retrieval_recall@{k}"])]
    with capsys.disabled():
        print(f"\nCLIP_benchmark 1.6.2 vs clipjax, {N_CLS} Fashion-MNIST test images "
              f"(retrieval: {N_RET} images x 5 captions), open_clip tiny ViT trained "
              f"{STEPS} steps:")
        for name, ours, theirs in pairs:
            print(f"  {name:<22} clip_benchmark {100 * theirs:6.2f}%  clipjax {100 * ours:6.2f}%")
    assert ref_cls["acc1"] > 0.3, f"the model did not learn (top-1 {ref_cls['acc1']:.3f})"
    for name, ours, theirs in pairs:
        assert abs(ours - theirs) <= 0.001, (name, ours, theirs)
