"""`--tasks datacomp` over a folder holding two of its datasets (the report, the average, the
skipped names), DataComp's extra metrics, and `train.eval_every`: the in-loop results
equal what `clipjax eval --checkpoint STEP` writes for the same params."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
from eval_data import save_tiny, tiny_config
from images import png

from clipjax import config as config_lib
from clipjax.cli import main
from clipjax.evaluate import suites

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wds(root, samples, classnames=None, templates=None, retrieval=False):
    """A CLIP_benchmark wds folder: root/test/0.tar (+ nshards.txt, names, templates)."""
    (root / "test").mkdir(parents=True)
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i, sample in enumerate(samples):
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"s{i:07d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / "test" / "nshards.txt").write_text("1\n")
    if classnames:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    if retrieval:
        (root / "dataset_type.txt").write_text("retrieval\n")


def _npy(row) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(row, np.int64))
    return buf.getvalue()


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
    """GeoDE (classification with region metadata) as DataComp's downloader names it, and
    Flickr30k (retrieval) as CLIP_benchmark's Hugging Face repo names it."""
    d = tmp_path_factory.mktemp("datacomp")
    rng = np.random.default_rng(0)  # distinct grey images
    images = [png(int(v), 20) for v in rng.permutation(250)[:12]]
    _wds(d / "wds_geode_test",
         [{"png": im, "cls": str(i % 3).encode(), "npy": _npy([i % 2, 7])}
          for i, im in enumerate(images)],
         classnames=["bag", "chair", "lamp"], templates=["a photo of a {c}."])
    _wds(d / "wds_flickr30k",
         [{"png": im, "txt": f"picture {i}\nan image number {i}".encode()}
          for i, im in enumerate(images[:8])], retrieval=True)
    return d


def test_datacomp_suite_reports_what_exists_and_names_the_rest(tmp_path, suite_dir, capsys):
    workdir = str(tmp_path / "run")
    save_tiny(workdir, 3)
    assert main(["eval", "--workdir", workdir, "--tasks", "datacomp", "--data-dir",
                 str(suite_dir), "--batch-size", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "datacomp: 2 of 38 datasets found" in out
    skipped = next(line for line in out.splitlines() if "skipped 34 not found" in line)
    assert "imagenet1k" in skipped and "vtab/caltech101" in skipped and "geode" not in skipped
    assert "skipped 2 not supported" in out and "misc/winogavil" in out
    geode = json.loads(open(os.path.join(workdir, "eval", "fairness-geode", "3.json")).read())
    flickr = json.loads(open(os.path.join(workdir, "eval", "retrieval-flickr30k",
                                          "3.json")).read())
    assert geode["num_groups"] == 2 and 0 <= geode["top1_worst_group"] <= geode["top1"] + 1e-9
    mean_r1 = (flickr["image_to_text_R@1"] + flickr["text_to_image_R@1"]) / 2
    average = 100 * (geode["top1_worst_group"] + mean_r1) / 2
    md = open(os.path.join(workdir, "eval", "datacomp", "3.md")).read()
    assert f"average over the 2 of 38 datasets evaluated: {average:.2f}%" in md
    assert f"average over the 2 of 38 datasets evaluated: {average:.2f}%" in out
    assert "| GeoDE | fairness/geode | top1_worst_group |" in md
    rows = open(os.path.join(workdir, "eval", "datacomp", "3.csv")).read().splitlines()
    assert rows[0] == "dataset,key,metric,value (%)" and rows[-1] == f"average,,,{average:.2f}"
    assert len(rows) == 4
    with open(os.path.join(workdir, "eval", "datacomp", "3.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_suite_without_any_dataset_is_one_clear_error(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    save_tiny(workdir, 1)
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--workdir", workdir, "--tasks", "clip_benchmark", "--data-dir",
                 str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "none of the datasets is under" in err and "wds_" in err
    assert main(["eval", "--workdir", workdir, "--tasks", "datacomp"]) == 1
    assert "give --data-dir" in capsys.readouterr().err


def test_worst_group_and_macro_f1():
    hits = np.array([1, 1, 0, 1, 0, 0], bool)
    assert suites.worst_group(hits, np.array([0, 0, 0, 1, 1, 2])) == 0.0
    assert suites.worst_group(hits, np.array([0, 0, 1, 1, 0, 1])) == pytest.approx(1 / 3)
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 5, 200), rng.integers(0, 6, 200)
    y[y == 3] = 4  # class 3 absent from the labels
    cm = np.zeros((6, 6), np.int64)
    np.add.at(cm, (y, p), 1)
    want = f1_score(y, p, average="macro", labels=np.unique(y))
    assert suites.f1_macro(cm) == pytest.approx(want)


def test_hf_names_resolve_to_a_cache_and_fail_in_one_line(tmp_path, monkeypatch):
    from clipjax.errors import ClipjaxError
    from clipjax.evaluate import clip_benchmark_wds as cbw

    assert cbw.hf_repo("hf:clip-benchmark/wds_cars") == "clip-benchmark/wds_cars"
    assert cbw.hf_repo("https://huggingface.co/datasets/djghosh/wds_geode_test/tree/main") == \
        "djghosh/wds_geode_test"
    assert cbw.hf_repo("/data/cars") is None
    monkeypatch.setenv("CLIPJAX_WDS_CACHE", str(tmp_path))
    cached = tmp_path / "clip-benchmark--wds_cars" / "test"
    cached.mkdir(parents=True)
    (cached / "0.tar").write_bytes(b"")
    assert cbw.resolve("hf:clip-benchmark/wds_cars") == str(tmp_path / "clip-benchmark--wds_cars")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the error path, without the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ClipjaxError, match="cannot download clip-benchmark/wds_nothing"):
        cbw.resolve("hf:clip-benchmark/wds_nothing")


def test_in_loop_eval_equals_the_separate_evaluator(tmp_path, suite_dir):
    """train.eval_every=4 of 8 steps with eval.tasks=datacomp: eval/<task>/{4,8}.json and
    the suite's table from inside the run; then `clipjax eval --checkpoint 4` on the
    checkpoint of the same step writes the same numbers (class embeddings recomputed: the
    in-loop eval/ folder, cache included, is moved away first)."""
    from clipjax.train import loop

    workdir = tmp_path / "run"
    model = tiny_config().model  # the suite test's architecture: its encoders are compiled
    config = config_lib.load(os.path.join(REPO, "configs", "tiny.py"), [
        f"--config.model.embed_dim={model.embed_dim}",
        *(f"--config.model.{tower}.{k}={model[tower][k]}" for tower, keys in (
            ("image", ("image_size", "patch_size", "width", "layers", "heads")),
            ("text", ("context_length", "width", "heads", "layers"))) for k in keys),
        "--config.data.batch_size=8", "--config.train.steps=8", "--config.train.ckpt_every=4",
        "--config.train.log_every=4", "--config.train.eval_every=4",
        "--config.eval.tasks=datacomp", f"--config.eval.data_dir={suite_dir}",
        "--config.eval.batch_size=8", "--config.train.peak_flops=1e11"])
    assert loop.train(config, str(workdir), progress=False) == 0
    names = ("fairness-geode", "retrieval-flickr30k")
    in_loop = {(t, s): json.loads((workdir / "eval" / t / f"{s}.json").read_text())
               for t in names for s in (4, 8)}
    assert in_loop["fairness-geode", 4]["step"] == 4
    assert "top1_worst_group" in in_loop["fairness-geode", 8]
    assert "average over the 2 of 38" in (workdir / "eval" / "datacomp" / "8.md").read_text()
    assert (workdir / "tb" / "eval").is_dir()
    shutil.move(workdir / "eval", tmp_path / "in_loop_eval")
    assert main(["eval", "--workdir", str(workdir), "--tasks", "datacomp", "--data-dir",
                 str(suite_dir), "--checkpoint", "4", "--batch-size", "8",
                 "--no-progress"]) == 0
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    for t in names:
        separate = json.loads((workdir / "eval" / t / "4.json").read_text())
        assert drop(separate) == drop(in_loop[t, 4]), t


def test_eval_every_without_tasks_is_refused(tmp_path):
    from clipjax.errors import ClipjaxError
    from clipjax.train.in_loop_eval import InLoopEval

    config = tiny_config()
    config.train.eval_every = 5
    with pytest.raises(ClipjaxError, match="train.eval_every needs eval.tasks"):
        InLoopEval(config, str(tmp_path))
