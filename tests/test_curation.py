"""`clipjax data score|filter|dedup` on Fashion-MNIST shards with a model trained here.

One module-scoped world: training shards from the train split (clean captions), a
small CLIP trained on them in this process, a pool of test-split shards written by
`data convert` in which 20% of the captions name a wrong class (plus a shard of bad
samples), and training shards with 200 planted test images (resized, JPEG q70,
centre-cropped to 90%) and 10 exact copies.
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import train_cli
from PIL import Image

from clipjax import cli
from clipjax.curation import rules as rules_lib
from clipjax.curation import tables
from clipjax.data import idx
from clipjax.data.convert import ShardWriter
from clipjax.errors import ClipjaxError

FM = idx.FASHION_MNIST_DIR
CLASSES = idx.FASHION_MNIST_CLASSES
N_TRAIN = 4000
STEPS = 150
N_POOL = 1000
POOL_SHARD = 250
WRONG = 0.2
PLANTED = 200
EXACT = 10
TEMPLATE = "a photo of a {}."

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(FM, "t10k-images-idx3-ubyte.gz")),
    reason="Debian's dataset-fashion-mnist is not installed")


def _main(*argv):
    code = cli.main([str(a) for a in argv])
    assert code == 0, argv


def _train(root, train_urls) -> str:
    """A small CLIP trained on the clean shards, in a 1-device subprocess (an emulated
    8-device mesh would spend most of each tiny step in collectives)."""
    workdir = root / "model"
    code, out = train_cli.finish(train_cli.start([
        sys.executable, "-m", "clipjax", "train", "--config",
        f"{train_cli.REPO}/configs/demo.py:{train_urls}", "--workdir", str(workdir),
        "--progress=off", f"--config.train.steps={STEPS}",
        f"--config.train.ckpt_every={STEPS}", f"--config.train.log_every={STEPS // 4}",
        "--config.data.batch_size=64", "--config.optim.lr=4e-3",
        "--config.optim.warmup_steps=10", "--config.model.embed_dim=32",
        "--config.model.image.layers=2", "--config.model.image.width=64",
        "--config.model.image.heads=2", "--config.model.image.patch_size=7",
        "--config.model.image.mlp_ratio=4.0", "--config.model.image.pool=tok",
        "--config.optim.weight_decay=0.05", "--config.optim.frozen=",
        "--config.model.text.layers=1",
        "--config.model.text.width=64", "--config.model.text.heads=2",
        "--config.data.augment.flip=False", "--config.data.augment.crop_scale=(1.0,1.0)"],
        devices=1))
    assert code == 0, out[-3000:]
    return str(workdir)


def _rewrite_captions(shard: str, wrong: dict[str, str]) -> None:
    """Replaces the .txt member of the keys in `wrong` (the rest byte for byte)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            key, ext = m.name.split(".", 1)
            if ext == "txt" and key in wrong:
                data = wrong[key].encode()
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def _bad_shard(path: str) -> None:
    """Two good samples and three bad ones: a truncated JPEG, an empty caption, Latin-1."""
    good = io.BytesIO()
    Image.fromarray(np.full((28, 28, 3), 128, np.uint8)).save(good, "JPEG")
    good = good.getvalue()
    samples = [("b0", good, b"a photo of a bag."), ("b1", good[: len(good) // 3], b"a bag"),
               ("b2", good, b"   "), ("b3", good, "un sac \xe9t\xe9".encode("latin-1")),
               ("b4", good, b"a photo of a sneaker.")]
    with tarfile.open(path, "w") as tar:
        for key, img, txt in samples:
            for name, data in ((f"{key}.jpg", img), (f"{key}.txt", txt)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


# Natural photos that ship with scikit-image, cut into 48 px tiles: distinct images with
# real texture. (Fashion-MNIST is no place to measure dedup precision: its images are
# look-alikes; as 16x16 thumbnails, at the cosine that finds 95% of copied test images,
# 80% of clean train images also have a test image that close.)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon",
          "hubble_deep_field", "immunohistochemistry", "clock", "cell")
TILE = 48


def _tiles():
    import skimage.data

    tiles = []
    for name in PHOTOS:
        a = np.asarray(getattr(skimage.data, name)())
        if a.dtype != np.uint8:
            a = (255 * (a - a.min()) / max(float(np.ptp(a)), 1e-9)).astype(np.uint8)
        a = a[..., :3] if a.ndim == 3 else a
        for y in range(0, a.shape[0] - TILE + 1, TILE):
            for x in range(0, a.shape[1] - TILE + 1, TILE):
                t = a[y:y + TILE, x:x + TILE]
                if t.std() > 20:  # not a flat patch of sky or background
                    tiles.append(t)
    return tiles


def _copied(tile) -> bytes:
    """A tile as a scraper might have copied it: upscaled 1.5x, centre-cropped to 90%,
    JPEG quality 70."""
    big = TILE * 3 // 2
    img = Image.fromarray(tile).convert("RGB").resize((big, big), Image.BICUBIC)
    c = round(big * 0.9)
    o = (big - c) // 2
    buf = io.BytesIO()
    img.crop((o, o, o + c, o + c)).save(buf, "JPEG", quality=70)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """An evaluation folder of 300 detailed tiles; training shards of the other tiles and
    of 200 copied + 10 byte-exact evaluation tiles."""
    root = tmp_path_factory.mktemp("dedup")
    tiles = _tiles()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(tiles))
    rich = [i for i in order if tiles[i].std() > 40][:300]
    assert len(rich) == 300
    evals = root / "eval"
    evals.mkdir()
    for n, i in enumerate(rich):
        Image.fromarray(tiles[i]).save(evals / f"{n:04d}.png")
    writer = ShardWriter(str(root / "distractors"), 10000, image_format="png")
    for i in sorted(set(order) - set(rich)):
        writer.write(tiles[i], "a photo")
    writer.close()
    distractor_count = writer.count
    writer = ShardWriter(str(root / "planted"), 10000)
    near = [writer.write(_copied(tiles[i]), "a photo") for i in rich[:PLANTED]]
    exact = []
    for i in rich[PLANTED:PLANTED + EXACT]:
        buf = io.BytesIO()
        Image.fromarray(tiles[i]).save(buf, "PNG")
        exact.append(writer.write(buf.getvalue(), "a photo"))
    writer.close()
    return {"root": root, "eval": str(evals), "distractors": f"{root}/distractors/00000.tar",
            "planted": f"{root}/planted/00000.tar", "near": near, "exact": exact,
            "distractor_count": distractor_count}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("curation")
    train = root / "train"
    _main("data", "convert", "--from", "idx", FM, "--split", "train", "--out", train,
          "--shard-size", N_TRAIN // 2, "--limit", N_TRAIN, "--image-format", "png",
          "--template", TEMPLATE)
    train_urls = f"{train}/{{00000..00001}}.tar"
    workdir = _train(root, train_urls)

    # The pool: test-split shards from `data convert`, 20% of captions naming a wrong class.
    pool = root / "pool"
    _main("data", "convert", "--from", "idx", FM, "--split", "test", "--out", pool,
          "--shard-size", POOL_SHARD, "--limit", N_POOL, "--image-format", "png",
          "--template", TEMPLATE)
    rng = np.random.default_rng(0)
    wrong_keys = set()
    for s in range(N_POOL // POOL_SHARD):
        shard = f"{pool}/{s:05d}.tar"
        with tarfile.open(shard) as tar:
            metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers()
                     if m.name.endswith(".json")]
        chosen = rng.choice(len(metas), int(WRONG * len(metas)), replace=False)
        wrong = {}
        for j in chosen:
            m = metas[j]
            other = (m["label"] + rng.integers(1, len(CLASSES))) % len(CLASSES)
            wrong[m["key"]] = TEMPLATE.format(CLASSES[other])
        _rewrite_captions(shard, wrong)
        wrong_keys |= set(wrong)
    bad = f"{pool}/{N_POOL // POOL_SHARD:05d}.tar"
    _bad_shard(bad)
    pool_urls = f"{pool}/{{00000..{N_POOL // POOL_SHARD:05d}}}.tar"

    scores = root / "scores"
    _main("data", "score", "--model", workdir, "--shards", pool_urls, "--out", scores,
          "--embeddings", "--batch-size", 128)

    return {"root": root, "workdir": workdir, "train_urls": train_urls, "pool_urls": pool_urls,
            "scores": str(scores), "wrong": wrong_keys, "bad": bad}


def _scores_table(directory):
    table, metas = tables.read_all(directory, None)
    return table.sort_by([("shard", "ascending"), ("key", "ascending")]), metas


def test_score_writes_one_table_per_shard_and_counts_bad_samples(world, capsys):
    table, metas = _scores_table(world["scores"])
    assert len(metas) == N_POOL // POOL_SHARD + 1
    assert table.num_rows == N_POOL + 2  # the bad shard's 2 good samples
    cos = table.column("cosine").to_numpy()
    np.testing.assert_allclose(table.column("clipscore").to_numpy(),
                               2.5 * np.maximum(cos, 0), rtol=1e-6)
    img = tables.embeddings(table, "image_embedding")
    txt = tables.embeddings(table, "text_embedding")
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=2e-3)  # float16
    np.testing.assert_allclose((img * txt).sum(1), cos, atol=3e-3)
    bad = next(m for m in metas if m["shard"] == world["bad"])
    assert bad["pairs"] == 2
    assert bad["skipped"] == {"decode_error": 1, "empty_caption": 1, "caption_not_utf8": 1}
    # Resume: every shard has its table, nothing is scored again.
    capsys.readouterr()
    _main("data", "score", "--model", world["workdir"], "--shards", world["pool_urls"],
          "--out", world["scores"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["shards_scored"] == 0 and report["shards_skipped_done"] == len(metas)


def test_filter_keep_fraction_drops_the_wrong_captions(world, capsys):
    out = world["root"] / "filtered"
    capsys.readouterr()
    _main("data", "filter", "--scores", world["scores"], "--shards", world["pool_urls"],
          "--out", out, "--keep-fraction", 0.8)
    report = json.loads(capsys.readouterr().out)
    # Captions are checked here; the truncated image was skipped by the scorer.
    assert report["dropped"]["bad_sample"] == 2 and report["dropped"]["not_scored"] == 1
    assert report["bad_samples"] == {"empty_caption": 1, "caption_not_utf8": 1}
    assert report["kept"] == round(0.8 * (N_POOL + 2))
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == report["kept"]
    kept = set()
    for name in sizes:
        with tarfile.open(out / name) as tar:
            kept |= {m.name.split(".")[0] for m in tar.getmembers()}
    dropped = {k for k in _all_pool_keys(world)} - kept
    wrong = world["wrong"]
    recall = len(wrong & dropped) / len(wrong)  # wrong pairs that were dropped
    precision = len(wrong & dropped) / len(dropped)
    with capsys.disabled():
        print(f"\nfilter --keep-fraction 0.8: dropped {len(wrong & dropped)}/{len(wrong)} wrong "
              f"pairs (recall {recall:.3f}), precision {precision:.3f}, "
              f"threshold {report['threshold']:.3f}")
    assert recall >= 0.8, (recall, precision)
    assert (out / "report.json").exists()
    assert (out / "score_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _all_pool_keys(world):
    table, _ = _scores_table(world["scores"])
    return [k for s, k in zip(table.column("shard").to_pylist(), table.column("key").to_pylist())
            if s != world["bad"]]


def test_filter_rules_and_errors():
    r = rules_lib.Rules(min_score=0.2, min_caption_words=3, english=True,
                        exclude=frozenset({("s", "k")}))
    assert rules_lib.verdict(r, 0.2, "s", "k", "a photo of a bag", 0.9) == "excluded"
    assert rules_lib.verdict(r, 0.2, "s", "x", "a bag", 0.9) == "caption_words"
    assert rules_lib.verdict(r, 0.2, "s", "x", "ein Foto von einer roten Tasche", 0.9) \
        == "not_english"
    assert rules_lib.verdict(r, 0.2, "s", "x", "a photo of a red bag", 0.1) == "score"
    assert rules_lib.verdict(r, 0.2, "s", "x", "a photo of a red bag", 0.2) is None
    assert rules_lib.verdict(r, 0.2, "s", "x", "a photo of a red bag", None) == "not_scored"
    keep = rules_lib.Rules(keep_fraction=0.3)
    assert rules_lib.threshold(keep, np.arange(10) / 10) == pytest.approx(0.7)
    with pytest.raises(ClipjaxError, match="keep-fraction"):
        rules_lib.Rules(keep_fraction=1.5)


def test_filter_without_scores_is_a_one_line_error(world, tmp_path, capsys):
    code = cli.main(["data", "filter", "--scores", str(tmp_path), "--shards",
                     world["pool_urls"], "--out", str(tmp_path / "o"), "--min-score", "0.2"])
    err = capsys.readouterr().err
    assert code != 0 and "no score tables" in err and "Traceback" not in err


def test_dedup_finds_planted_test_images_and_filter_excludes_them(world, photos, capsys):
    planted = photos["planted"]
    shards = f"{world['train_urls']}::{photos['distractors']}::{planted}"
    out = photos["root"] / "dups.tsv"
    capsys.readouterr()
    _main("data", "dedup", "--shards", shards, "--against", photos["eval"],
          "--threshold", 0.95, "--features", "pixels", "--out", out)
    report = json.loads(capsys.readouterr().out)
    rows = [line.split("\t") for line in out.read_text().splitlines()[1:]]
    flagged = {(r[0], r[1]) for r in rows}
    near = {(planted, k) for k in photos["near"]}
    exact = {(planted, k) for k in photos["exact"]}
    found = len(near & flagged)
    precision = len((near | exact) & flagged) / max(len(flagged), 1)
    with capsys.disabled():
        print(f"\ndedup: found {found}/{PLANTED} planted near-duplicates (recall "
              f"{found / PLANTED:.3f}), precision {precision:.3f}; {report}")
    assert found / PLANTED >= 0.95 and precision >= 0.95
    assert exact <= {(r[0], r[1]) for r in rows if r[4] == "exact"}
    assert report["training_samples"] == N_TRAIN + photos["distractor_count"] + PLANTED + EXACT
    assert report["eval_images"] == len(os.listdir(photos["eval"]))

    # filter --exclude drops them (those shards scored first).
    both = f"{photos['distractors']}::{planted}"
    scores = photos["root"] / "scores"
    _main("data", "score", "--model", world["workdir"], "--shards", both, "--out", scores)
    capsys.readouterr()
    _main("data", "filter", "--scores", scores, "--shards", both, "--out",
          photos["root"] / "clean", "--min-score", -1, "--exclude", out)
    report = json.loads(capsys.readouterr().out)
    listed = len([f for f in flagged if f[0] in (planted, photos["distractors"])])
    assert report["dropped"]["excluded"] == listed
    assert report["kept"] == photos["distractor_count"] + PLANTED + EXACT - listed


def test_dedup_reads_eval_task_sources(tmp_path):
    from clipjax.curation import dedup

    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    idx.write_idx(str(tmp_path / "t10k-images-idx3-ubyte.gz"), images)
    idx.write_idx(str(tmp_path / "t10k-labels-idx1-ubyte.gz"), np.arange(5, dtype=np.uint8))
    got = list(dedup.eval_images(f"idx:{tmp_path}"))
    assert len(got) == 5 and got[0][0].endswith("#0")
    np.testing.assert_array_equal(np.asarray(got[3][1])[..., 0], images[3])
    with pytest.raises(ClipjaxError):
        list(dedup.eval_images("no_such_task"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_score_disjoint_shards_equal_to_one(world, tmp_path):
    out = tmp_path / "scores2"
    port = _free_port()
    procs = [train_cli.start(
        [sys.executable, "-m", "clipjax", "data", "score", "--model",
         world["workdir"], "--shards", world["pool_urls"], "--out", str(out),
         "--batch-size", "128", "--config.runtime.distributed=on",
         f"--config.runtime.coordinator_address=127.0.0.1:{port}",
         "--config.runtime.num_processes=2", f"--config.runtime.process_id={i}"], devices=4)
        for i in range(2)]
    results = [train_cli.finish(p) for p in procs]
    for code, text in results:
        assert code == 0, text[-3000:]
    reports = [json.loads(text.strip().splitlines()[-1]) for _, text in results]
    assert sorted(r["process"] for r in reports) == [0, 1]
    assert sum(r["shards_scored"] for r in reports) == N_POOL // POOL_SHARD + 1
    names = [n for n in os.listdir(out) if n.endswith(".parquet")]
    assert len(names) == N_POOL // POOL_SHARD + 1
    owners = {json.loads(pq.read_schema(out / n).metadata[b"clipjax"])["shard"] for n in names}
    assert len(owners) == len(names)
    two, _ = _scores_table(str(out))
    one, _ = _scores_table(world["scores"])
    for col in ("shard", "key", "caption"):
        assert two.column(col).to_pylist() == one.column(col).to_pylist()
    np.testing.assert_allclose(two.column("cosine").to_numpy(),
                               one.column("cosine").to_numpy(), atol=1e-5)
