"""Sources other than tar shards (TFDS without TensorFlow, folders, IDX, mixtures, synthetic),
augmentation, and the `clipjax data` commands."""

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from clipjax import cli
from clipjax import config as config_lib
from clipjax.data import augment, captions, decode, idx, pipeline, sources
from clipjax.data.tokenizers import build_tokenizer
from clipjax.errors import ClipjaxError, ConfigError


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(config_lib.default_config().model)


def base_config(batch_size=4, **train):
    c = config_lib.default_config()
    c.model.image.image_size = 32
    c.data.batch_size = batch_size
    c.data.workers = 0
    for k, v in train.items():
        c.data.train[k] = v
    return config_lib.validate(c)


def decode_rows(tokenizer, texts):
    return {tokenizer(t)[0].tobytes(): t for t in texts}


# --------------------------------------------------------------------------- TFDS

TFDS_BUILDER = '''
import sys
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

class TinyPets(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=["tabby_cat", "pug"]),
            "caption": tfds.features.Text(),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(10)}

    def _generate_examples(self, n):
        rng = np.random.default_rng(0)
        for i in range(n):
            img = Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8))
            yield i, {"image": img, "label": i % 2, "caption": f"tfds caption {i}"}

TinyPets(data_dir=sys.argv[1], file_format="array_record").download_and_prepare()
assert "tensorflow" not in sys.modules
'''


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """An array_record TFDS dataset built here, without TensorFlow."""
    d = tmp_path_factory.mktemp("tfds")
    script = d / "build.py"
    script.write_text(TFDS_BUILDER)
    subprocess.run([sys.executable, str(script), str(d)], check=True, capture_output=True,
                   timeout=120)
    return str(d)


def test_tfds_data_source_without_tensorflow(tfds_dir, tokenizer):
    assert "tensorflow" not in sys.modules
    c = base_config(5, source="tfds", name="tiny_pets", data_dir=tfds_dir)
    p = pipeline.build_train_pipeline(c, epochs=1, tokenizer=tokenizer)
    table = decode_rows(tokenizer, [f"tfds caption {i}" for i in range(10)])
    got = [table[r.tobytes()] for b in p for r in b["text"]]
    assert sorted(got) == sorted(table.values())
    p.close()
    # No caption feature under that key -> class labels through templates.
    c = base_config(10, source="tfds", name="tiny_pets", data_dir=tfds_dir,
                    caption_key="nope", templates=("a {} here.",))
    p = pipeline.build_train_pipeline(c, epochs=1, tokenizer=tokenizer)
    table = decode_rows(tokenizer, ["a tabby cat here.", "a pug here."])
    got = [table[r.tobytes()] for r in next(p)["text"]]
    assert sorted(got) == ["a pug here."] * 5 + ["a tabby cat here."] * 5
    p.close()
    assert "tensorflow" not in sys.modules
    with pytest.raises(ClipjaxError, match="not readable"):
        sources.TfdsSource("no_such_set", data_dir=tfds_dir)


def test_convert_tfds_to_shards(tfds_dir, tmp_path):
    out = tmp_path / "shards"
    rc = cli.main(["data", "convert", "--from", "tfds", "tiny_pets", "--data-dir", tfds_dir,
                   "--out", str(out), "--shard-size", "4"])
    assert rc == 0
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"00000.tar": 4, "00001.tar": 4, "00002.tar": 2}
    with tarfile.open(out / "00000.tar") as tf:
        names = tf.getnames()
        assert names[0].endswith(".png")  # the stored PNG is copied, not re-encoded
        assert tf.extractfile(names[1]).read().decode().startswith("tfds caption ")


# --------------------------------------------------------------------------- folder, idx


def test_class_folder_source(tmp_path, tokenizer):
    rng = np.random.default_rng(1)
    for c, n in (("golden_retriever", 3), ("tabby", 2)):
        (tmp_path / c).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(
                tmp_path / c / f"{i}.png")
    (tmp_path / "tabby" / "notes.md").write_text("ignored")
    listing = sources.folder_lib.scan_folder(str(tmp_path))
    assert listing.kind == "classes" and listing.classnames == ["golden_retriever", "tabby"]
    assert listing.labels == [0, 0, 0, 1, 1]
    c = base_config(5, source="folder", path=str(tmp_path), templates=("{} pic",),
                    caption_choice="first")
    p = pipeline.build_train_pipeline(c, epochs=1, tokenizer=tokenizer)
    table = decode_rows(tokenizer, ["golden retriever pic", "tabby pic"])
    got = sorted(table[r.tobytes()] for r in next(p)["text"])
    assert got == ["golden retriever pic"] * 3 + ["tabby pic"] * 2
    p.close()
    with pytest.raises(ClipjaxError, match="not found"):
        sources.folder_lib.scan_folder(str(tmp_path / "missing"))


def test_idx_reader_and_converter(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 255, (12, 28, 28), dtype=np.uint8)
    labels = np.arange(12, dtype=np.uint8) % 10
    d = tmp_path / "fashion-mnist"
    d.mkdir()
    idx.write_idx(str(d / "t10k-images-idx3-ubyte.gz"), images)
    idx.write_idx(str(d / "t10k-labels-idx1-ubyte.gz"), labels)
    x, y = idx.load_split(str(d), "test")
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    with pytest.raises(ClipjaxError, match="no train-images"):
        idx.load_split(str(d), "train")
    (d / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ClipjaxError, match="not an IDX"):
        idx.read_idx(str(d / "bad"))

    def run(out, seed):
        rc = cli.main(["data", "convert", "--from", "idx", str(d), "--split", "test",
                       "--out", str(out), "--shard-size", "5", "--seed", str(seed),
                       "--image-format", "png", "--template", "a photo of a {}.",
                       "--template", "a sketch of a {}."])
        assert rc == 0
        metas = []
        for name in json.loads((out / "sizes.json").read_text()):
            with tarfile.open(out / name) as tf:
                for m in tf.getmembers():
                    if m.name.endswith(".json"):
                        metas.append(json.loads(tf.extractfile(m).read()))
                    if m.name == "000000003.png":
                        pixels = np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())))
        return metas, pixels

    metas, pixels = run(tmp_path / "a", 0)
    assert len(metas) == 12
    assert [m["label"] for m in metas] == labels.tolist()
    assert metas[0]["classname"] == idx.FASHION_MNIST_CLASSES[0]
    assert all(m["caption"] in (f"a photo of a {m['classname']}.",
                                f"a sketch of a {m['classname']}.") for m in metas)
    assert len({m["caption"].split()[1] for m in metas}) == 2  # both templates drawn
    np.testing.assert_array_equal(pixels[..., 0], images[3])  # PNG: lossless
    assert run(tmp_path / "b", 0)[0] == metas  # seeded
    assert [m["caption"] for m in run(tmp_path / "c", 1)[0]] != [m["caption"] for m in metas]


# --------------------------------------------------------------------------- mixture, synthetic


def _folder(tmp_path, name, n, rng):
    d = tmp_path / name
    d.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
        (d / f"{i}.txt").write_text(f"{name} {i}")
    return str(d)


def test_weighted_mixture(tmp_path, tokenizer):
    rng = np.random.default_rng(3)
    a, b = _folder(tmp_path, "alpha", 8, rng), _folder(tmp_path, "beta", 8, rng)
    mix = ((json.dumps({"source": "folder", "path": a}), 3.0),
           (json.dumps({"source": "folder", "path": b}), 1.0))
    c = base_config(16, source="mixture", mixture=mix)
    p = pipeline.build_train_pipeline(c, tokenizer=tokenizer)
    table = decode_rows(tokenizer, [f"{n} {i}" for n in ("alpha", "beta") for i in range(8)])
    got = [table[r.tobytes()] for _ in range(4) for r in next(p)["text"]]
    p.close()
    n_alpha = sum(t.startswith("alpha") for t in got)
    assert n_alpha == 48  # exactly 3:1 over 64 samples
    assert len(set(got[:32]) & {f"alpha {i}" for i in range(8)}) == 8
    with pytest.raises(ConfigError, match="mixture"):
        pipeline.build_train_pipeline(
            base_config(4, source="mixture", mixture=(('{"source": "folder", "pth": 1}', 1.0),)))


def test_synthetic_batches():
    c = base_config(6)
    c.model.text.context_length = 16
    p = pipeline.build_train_pipeline(c, process_index=1, process_count=2)
    b1, b2 = next(p), next(p)
    assert b1["image"].shape == (3, 32, 32, 3) and b1["image"].dtype == np.float32
    assert b1["text"].shape == (3, 16) and b1["text"].dtype == np.int32
    eot = c.model.text.vocab_size - 1
    assert (b1["text"].argmax(-1) == (b1["text"] == eot).argmax(-1)).all()
    assert not np.array_equal(b1["image"], b2["image"])
    p.close()


# --------------------------------------------------------------------------- decode, augment


def test_crop_box_follows_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = augment.crop_box(320, 200, (0.3, 0.6), (0.5, 2.0), rng)
        assert 0 <= left and left + w <= 320 and 0 <= top and top + h <= 200
        assert 0.28 <= w * h / (320 * 200) <= 0.62
        assert 0.45 <= w / h <= 2.2
    # No valid box (extreme ratio range on a thin image): the clipped centre crop.
    assert augment.crop_box(100, 10, (0.9, 1.0), (0.01, 0.02), rng) == (49, 0, 1, 10)


def test_random_resized_crop_flip_and_draft():
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, :30] = 255  # left half white
    crop = augment.RandomResizedCrop(16, (1.0, 1.0), (1.5, 1.5), flip=True)
    outs = {int(crop(Image.fromarray(arr), np.random.default_rng(s))[:, 0].mean() > 128)
            for s in range(10)}
    assert outs == {0, 1}  # flipped and not flipped
    buf = io.BytesIO()
    Image.fromarray(np.full((1600, 1200, 3), 90, np.uint8)).save(buf, "JPEG")
    img = decode.open_image(buf.getvalue(), 10**8)
    assert augment.draft_size(*img.size, 224, (0.9, 1.0), (3 / 4, 4 / 3)) is not None
    out = augment.RandomResizedCrop(224)(img, np.random.default_rng(0))
    assert out.shape == (224, 224, 3) and abs(int(out.mean()) - 90) <= 2


def test_caption_rules():
    rng = np.random.default_rng(0)
    assert decode.caption_candidates(b"  two\n lines ") == ["two lines"]
    assert decode.caption_candidates(b"one\n\ntwo", split_lines=True) == ["one", "two"]
    picks = {decode.pick_caption(["a", "b", "c"], "random", rng) for _ in range(30)}
    assert picks == {"a", "b", "c"}
    for text, reason in ((None, "missing_caption"), (b" ", "empty_caption"),
                         (b"\xff", "caption_not_utf8"), ([b"", ""], "empty_caption")):
        with pytest.raises(decode.BadSample) as e:
            decode.caption_candidates(text)
        assert e.value.reason == reason
    with pytest.raises(ClipjaxError):
        captions.check_templates(("no placeholder",))


# --------------------------------------------------------------------------- data check


def test_data_check_command(tmp_path, capsys):
    rng = np.random.default_rng(4)
    raw = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(raw, "JPEG")
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name, data in (("a.jpg", raw.getvalue()), ("a.txt", b"fine"),
                           ("b.jpg", b"not a jpeg"), ("b.txt", b"broken"), ("c.jpg", b""),
                           ("c.txt", b"zero bytes"), ("d.jpg", raw.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert cli.main(["data", "check", str(tmp_path / "s.tar"), "--image-size", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {"samples": 1, "skipped": {"decode_error": 1, "empty_image": 1,
                                                "missing_caption": 1},
                      "first_bad": [f"{tmp_path}/s.tar:{k}" for k in "bcd"]}
    with tarfile.open(tmp_path / "bad.tar", "w") as tf:
        info = tarfile.TarInfo("x.jpg")
        tf.addfile(info, io.BytesIO(b""))
    assert cli.main(["data", "check", str(tmp_path / "bad.tar")]) == 1
    assert json.loads(capsys.readouterr().out)["samples"] == 0
    assert cli.main(["data", "check", str(tmp_path / "none.tar")]) == 1
    assert "shard not found" in capsys.readouterr().err


def test_epoch_order_is_a_permutation_per_epoch_with_windows():
    sizes = [3, 0, 5, 2, 7, 1, 4]
    everything = sorted((s, i) for s, n in enumerate(sizes) for i in range(n))
    order = sources.EpochOrder(sizes, seed=5, window=2)
    epochs = [[order.locate(e * 22 + j) for j in range(22)] for e in range(3)]
    for e in epochs:
        assert sorted(e) == everything
    assert epochs[0] != epochs[1] != epochs[2]
    # Window 2: consecutive positions come from two shards until both are used up.
    windows, offsets = order._epoch(0)
    assert [len(w) for w in windows] == [2, 2, 2, 1]
    for w, (lo, hi) in zip(windows, zip(offsets[:-1], offsets[1:])):
        assert {s for s, _ in epochs[0][lo:hi]} <= set(w.tolist())
        assert hi - lo == sum(sizes[s] for s in w)
    unshuffled = sources.EpochOrder(sizes, seed=5, shuffle=False)
    assert [unshuffled.locate(j) for j in range(22)] == everything


def test_endless_stream_without_valid_samples_fails_clearly(tmp_path, tokenizer):
    with tarfile.open(tmp_path / "bad.tar", "w") as tf:
        for name, data in (("a.jpg", b""), ("a.txt", b"zero-byte image")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    c = base_config(2, source="webdataset", urls=str(tmp_path / "bad.tar"))
    p = pipeline.build_train_pipeline(c, tokenizer=tokenizer)
    with pytest.raises(ClipjaxError, match="no valid sample in the last 1011 records"):
        next(p)
    p.close()
