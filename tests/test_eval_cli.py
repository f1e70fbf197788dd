"""`clipjax eval` end to end on tiny random models: checkpoint following (--watch with a
half-written checkpoint), results layout, errors, and the data sources."""

import io
import json
import os
import shutil
import tarfile
import threading
import time

import numpy as np
import pytest
from eval_data import save_tiny, tiny_config, write_idx_split
from images import png
from PIL import Image

from clipjax import checkpoint
from clipjax.cli import main
from clipjax.data import idx
from clipjax.errors import ClipjaxError
from clipjax.evaluate import datasets, evaluator, results, tasks


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("idx"))
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 24)):
        write_idx_split(d, split, rng.integers(0, 255, (n, 20, 20), dtype=np.uint8),
                        rng.integers(0, 3, n, dtype=np.uint8))
    return d


@pytest.fixture(scope="module")
def classnames(tmp_path_factory):
    p = tmp_path_factory.mktemp("names") / "names.txt"
    p.write_text("circle\nsquare\ntriangle\n")
    return str(p)


def _snapshot(directory):
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, directory)] = os.path.getmtime(p)
    return out


def test_watch_picks_up_new_checkpoint_and_ignores_half_written(tmp_path, idx_dir, classnames):
    workdir = str(tmp_path / "run")
    config = tiny_config(train_steps=20)
    opts = evaluator.Options(tasks=tasks.parse_list(f"shapes=idx:{idx_dir}"), checkpoint="all",
                             watch=True, watch_timeout=120, poll_interval=0.2,
                             classnames=classnames, batch_size=8, progress=False)
    logs, out = [], {}
    # Started before the training run has written anything: it waits for config.json.
    thread = threading.Thread(
        target=lambda: out.update(evaluator.Evaluator(workdir, opts, log=logs.append).run()))
    thread.start()
    time.sleep(0.5)
    save_tiny(workdir, 10, config)
    ckpts = checkpoint.checkpoint_dir(workdir)
    # What orbax leaves while step 30 is still being written: a temporary directory.
    shutil.copytree(os.path.join(ckpts, "10"),
                    os.path.join(ckpts, "30.orbax-checkpoint-tmp-1234567"))
    before = _snapshot(ckpts)
    first = results.result_path(workdir, "shapes", 10)
    deadline = time.time() + 90
    while not os.path.exists(first) and time.time() < deadline and thread.is_alive():
        time.sleep(0.1)
    assert os.path.exists(first), logs
    save_tiny(workdir, 20, config)  # written after the evaluator started; the final step
    before.update({k: v for k, v in _snapshot(ckpts).items() if k.startswith("20")})
    thread.join(timeout=120)
    assert not thread.is_alive(), logs
    assert sorted(out) == [10, 20], logs
    assert not os.path.exists(results.result_path(workdir, "shapes", 30))
    assert _snapshot(ckpts) == before  # the evaluator wrote nothing into checkpoints/
    rec = json.load(open(results.result_path(workdir, "shapes", 20)))
    assert rec["step"] == 20 and rec["task"] == "shapes" and rec["num_examples"] == 24
    assert 0 <= rec["top1"] <= rec["top5"] <= 1
    assert os.path.exists(os.path.join(workdir, "eval", "shapes", "top1.png"))
    assert os.listdir(os.path.join(workdir, "tb", "eval"))
    assert any("waiting for" in line for line in logs)
    assert any("last" in line for line in logs)


def test_cli_results_cache_and_rerun(tmp_path, idx_dir, classnames, capsys):
    workdir = str(tmp_path / "imported")
    save_tiny(workdir, 0)
    tpl = tmp_path / "tpl.txt"
    tpl.write_text("a drawing of a {}.\na {} shape.\n")
    args = ["eval", "--workdir", workdir, "--tasks", f"shapes=idx:{idx_dir},"
            f"probe=idx:{idx_dir}@linear_probe", "--classnames", classnames,
            "--templates", str(tpl), "--confusion-matrix", "--no-progress", "--batch-size", "8"]
    assert main(args) == 0
    rec = json.load(open(results.result_path(workdir, "shapes", 0)))
    assert rec["num_templates"] == 2 and rec["num_classes"] == 3
    assert set(rec) >= {"step", "task", "num_examples", "top1", "top5", "mean_per_class_recall"}
    probe = json.load(open(results.result_path(workdir, "probe", 0)))
    assert probe["mode"] == "linear_probe" and probe["num_train"] == 40
    # A count, not a fraction: printed as one (it once read "num_train 4000.00%").
    summary = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step 0 probe:")]
    assert len(summary) == 1 and "the probe fit on 40," in summary[0]
    assert "num_train" not in summary[0], summary[0]
    assert os.path.exists(os.path.join(workdir, "eval", "shapes", "confusion_0.png"))
    cache = os.listdir(os.path.join(workdir, "eval", "cache", "shapes"))
    assert len(cache) == 1 and cache[0].startswith("0-")
    # The cached classifier is what a fresh ensemble gives.
    ev = evaluator.Evaluator(workdir, evaluator.Options(tasks=[]))
    enc = ev.encoder(checkpoint.restore_params(workdir, 0))
    from clipjax.evaluate import zeroshot

    fresh = zeroshot.build_classifier(enc.encode_texts, ["circle", "square", "triangle"],
                                      ["a drawing of a {}.", "a {} shape."])
    cached = np.load(os.path.join(workdir, "eval", "cache", "shapes", cache[0]))
    np.testing.assert_allclose(cached, fresh, atol=1e-5)
    capsys.readouterr()
    assert main(args) == 0  # a second run finds the results and skips
    assert "results exist" in capsys.readouterr().out


def test_no_checkpoint_is_a_clear_error(tmp_path, capsys):
    workdir = str(tmp_path / "empty")
    checkpoint.write_config(workdir, tiny_config())
    assert main(["eval", "--workdir", workdir, "--tasks", "fashion_mnist"]) == 1
    err = capsys.readouterr().err
    assert "no finalized checkpoint" in err and "--watch" in err
    assert main(["eval", "--workdir", str(tmp_path / "nothing"), "--tasks", "mnist"]) == 1
    assert "config.json" in capsys.readouterr().err


def test_unknown_task_lists_known_ones(tmp_path, capsys):
    assert main(["eval", "--workdir", str(tmp_path), "--tasks", "fashion_mnist,imagenet_22k"]) == 1
    err = capsys.readouterr().err
    assert "unknown task 'imagenet_22k'" in err
    for name in ("fashion_mnist", "mnist", "cifar10", "cifar100", "imagenet1k", "food101"):
        assert name in err
    assert main(["eval", "--workdir", str(tmp_path), "--tasks", "help"]) == 0
    assert "oxford_pets" in capsys.readouterr().out


def test_task_strings():
    t = tasks.parse("pets=folder:/data/pets@linear_probe?split=val")
    assert (t.label, t.dataset, t.mode, t.split) == ("pets", "folder:/data/pets",
                                                     "linear_probe", "val")
    assert tasks.parse("cifar10@linear_probe").label == "cifar10@linear_probe"
    assert tasks.parse("captions:/x/flickr").mode == "retrieval"
    with pytest.raises(ClipjaxError, match="unknown mode"):
        tasks.parse("cifar10@finetune")
    with pytest.raises(ClipjaxError, match="appear twice"):
        tasks.parse_list("mnist,mnist")


def test_folder_wds_and_caption_sources(tmp_path):
    rng = np.random.default_rng(0)

    for name in ("red_fox", "blue_jay"):
        d = tmp_path / "folder" / "test" / name
        d.mkdir(parents=True)
        for i in range(3):
            (d / f"{i}.png").write_bytes(png(int(rng.integers(255))))
    src = tasks.load_source(tasks.parse(f"folder:{tmp_path / 'folder'}"), "test")
    assert src.classnames == ["blue jay", "red fox"] and len(src) == 6
    assert [label for _, label in src] == [0, 0, 0, 1, 1, 1]

    wds = tmp_path / "wds"
    (wds / "test").mkdir(parents=True)
    (wds / "classnames.txt").write_text("cat\ndog\n")
    (wds / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    with tarfile.open(wds / "test" / "0.tar", "w") as tar:
        for i in range(5):
            for ext, data in (("webp", png(i * 40)), ("cls", str(i % 2).encode())):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    task = tasks.parse(f"wds:{wds}")
    src = tasks.load_source(task, "test")
    assert len(src) == 5 and [y for _, y in src] == [0, 1, 0, 1, 0]
    assert tasks.classnames_for(task, src) == ["cat", "dog"]
    assert tasks.templates_for(task, src) == ["a photo of a {}."]

    caps = tmp_path / "caps"
    caps.mkdir()
    for i in range(2):
        (caps / f"{i}.png").write_bytes(png(i))
        (caps / f"{i}.txt").write_text(f"caption a{i}\ncaption b{i}\n")
    src = tasks.load_source(tasks.parse(f"captions:{caps}"), "test")
    assert src.kind == "retrieval" and [c for _, c in src][1] == ["caption a1", "caption b1"]


def test_read_idx_rejects_a_truncated_file(tmp_path):
    write_idx_split(str(tmp_path), "test", np.zeros((4, 5, 5), np.uint8), np.zeros(4, np.uint8))
    raw = tmp_path / "t10k-images-idx3-ubyte"
    import gzip

    raw.write_bytes(gzip.open(str(raw) + ".gz").read()[:-3])
    with pytest.raises(ClipjaxError, match="header says"):
        idx.read_idx(str(raw))


def test_config_file_drives_a_retrieval_task(tmp_path):
    workdir = str(tmp_path / "imported")
    save_tiny(workdir, 0)
    caps = tmp_path / "caps"
    caps.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(caps / f"{i}.png")
        (caps / f"{i}.txt").write_text("\n".join(f"caption {j} of {i}" for j in range(i % 3 + 1)))
    cfg = tmp_path / "eval_cfg.py"
    cfg.write_text(
        "from clipjax.config import default_config\n\n\n"
        "def get_config(arg=None):\n"
        "    c = default_config()\n"
        f"    c.eval.tasks = 'flickr=captions:{caps}'\n"
        "    c.eval.batch_size = 8\n"
        "    return c\n")
    assert main(["eval", "--workdir", workdir, "--config", str(cfg), "--no-progress"]) == 0
    rec = json.load(open(results.result_path(workdir, "flickr", 0)))
    assert rec["mode"] == "retrieval" and rec["num_examples"] == 6 and rec["num_texts"] == 12
    for k in (1, 5, 10):
        assert 0 <= rec[f"image_to_text_R@{k}"] <= 1 and 0 <= rec[f"text_to_image_R@{k}"] <= 1
    assert rec["text_to_image_R@10"] == 1.0  # only 6 images: every one is in the top 10
    assert os.path.exists(os.path.join(workdir, "eval", "flickr", "image_to_text_R_1.png"))


TFDS_BUILDER = '''
import sys
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

class EvalPets(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=["tabby_cat", "pug"]),
        }))

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples(6)}

    def _generate_examples(self, n):
        rng = np.random.default_rng(0)
        for i in range(n):
            img = Image.fromarray(rng.integers(0, 255, (18, 22, 3), dtype=np.uint8))
            yield i, {"image": img, "label": i % 2}

EvalPets(data_dir=sys.argv[1], file_format="array_record").download_and_prepare()
'''


def test_tfds_source_by_name(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "build.py"
    script.write_text(TFDS_BUILDER)
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True,
                   capture_output=True, timeout=180)
    task = tasks.parse("tfds:eval_pets")
    src = tasks.load_source(task, "test", str(tmp_path))
    assert len(src) == 6 and tasks.classnames_for(task, src) == ["tabby cat", "pug"]
    pairs = list(src)  # images stay encoded until the evaluator's workers decode them
    assert all(isinstance(im, bytes) for im, _ in pairs)
    assert all(datasets.decode(im).size == (22, 18) for im, _ in pairs)
    assert sorted(y for _, y in pairs) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ClipjaxError, match="not readable"):
        tasks.load_source(tasks.parse("tfds:no_such_dataset_here"), "test", str(tmp_path))


def test_watch_for_one_step_stops_after_it(tmp_path, idx_dir, classnames):
    workdir = str(tmp_path / "run")
    save_tiny(workdir, 5, tiny_config(train_steps=1000))
    opts = evaluator.Options(tasks=tasks.parse_list(f"shapes=idx:{idx_dir}"), checkpoint="5",
                             watch=True, watch_timeout=300, poll_interval=0.1,
                             classnames=classnames, batch_size=8, progress=False)
    t0 = time.time()
    out = evaluator.Evaluator(workdir, opts, log=lambda _: None).run()
    assert sorted(out) == [5] and time.time() - t0 < 120


def test_unreadable_images_are_skipped_and_counted(tmp_path, capsys):
    """One truncated and one empty file in a class folder, one corrupt sample in a wds
    shard: each is left out and counted; the rest scores as it does without them."""
    workdir = str(tmp_path / "imported")
    save_tiny(workdir, 0)
    rng = np.random.default_rng(1)
    clean, dirty = tmp_path / "clean", tmp_path / "dirty"
    for name in ("circle", "square"):
        for root in (clean, dirty):
            (root / "test" / name).mkdir(parents=True)
        for i in range(4):
            data = png(int(rng.integers(255)))
            (clean / "test" / name / f"{i}.png").write_bytes(data)
            (dirty / "test" / name / f"{i}.png").write_bytes(data)
    good = (dirty / "test" / "circle" / "0.png").read_bytes()
    (dirty / "test" / "circle" / "9.png").write_bytes(good[: len(good) // 2])  # truncated
    (dirty / "test" / "square" / "9.jpg").write_bytes(b"")
    wds = tmp_path / "wds"
    (wds / "test").mkdir(parents=True)
    (wds / "classnames.txt").write_text("circle\nsquare\n")
    with tarfile.open(wds / "test" / "0.tar", "w") as tar:
        for i in range(4):
            image = b"not an image" if i == 2 else png(i * 50)
            for ext, data in (("png", image), ("cls", str(i % 2).encode())):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert main(["eval", "--workdir", workdir, "--no-progress", "--batch-size", "8", "--tasks",
                 f"clean=folder:{clean},dirty=folder:{dirty},shards=wds:{wds}"]) == 0
    out = capsys.readouterr().out
    rec = {t: json.load(open(results.result_path(workdir, t, 0)))
           for t in ("clean", "dirty", "shards")}
    assert rec["clean"]["skipped"] == 0 and rec["clean"]["num_examples"] == 8
    assert rec["dirty"]["skipped"] == 2 and rec["dirty"]["num_examples"] == 8
    assert rec["dirty"]["skipped_reasons"] == {"decode_error": 1, "empty_image": 1}
    assert rec["dirty"]["top1"] == rec["clean"]["top1"]
    assert rec["shards"]["skipped"] == 1 and rec["shards"]["num_examples"] == 3
    assert "2 skipped" in out and "skipped 2 unreadable image(s)" in out
