"""Webdataset input pipeline: exact epochs, robustness, process sharding, orbax resume."""

import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
import pytest
from images import jpeg
from PIL import Image

from clipjax import config as config_lib
from clipjax.data import convert, pipeline, webdataset
from clipjax.data.tokenizers import build_tokenizer
from clipjax.errors import ClipjaxError

N_FOLDER = 23  # captioned images written by the converter, shard size 5 -> 5 shards
GOOD_HAND = ("h00", "h06", "h07", "h08")
HAND_SKIPS = {"decode_error": 1, "empty_image": 1, "decompression_bomb": 1,
              "missing_caption": 1, "caption_not_utf8": 1, "empty_caption": 1,
              "truncated_member": 1}




def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring width x height pixels with almost no data: a decompression bomb."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def caption(i: int) -> str:
    return f"folder sample number {i}"


def hand_caption(key: str) -> str:
    return f"hand made sample {key}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Converter shards from a captioned folder + a hand-made tar of planted bad samples."""
    root = tmp_path_factory.mktemp("wds")
    rng = np.random.default_rng(0)
    folder = root / "folder"
    folder.mkdir()
    for i in range(N_FOLDER):
        (folder / f"img{i:03d}.jpg").write_bytes(jpeg(rng, 30 + i, 40))
        (folder / f"img{i:03d}.txt").write_text(caption(i))
    shards = root / "shards"
    report = convert.convert_source("folder", str(folder), str(shards), 5)
    assert report == {"samples": N_FOLDER, "skipped": {}, "shards": 5, "out": str(shards)}

    hand = root / "hand"
    hand.mkdir()
    good = jpeg(rng)
    gray = _png(Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)))
    rgba = _png(Image.fromarray(rng.integers(0, 255, (25, 25, 4), dtype=np.uint8)))
    cmyk = jpeg(rng, mode="CMYK")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        def sample(key, image=None, text=None, ext="jpg"):
            if image is not None:
                _add(tf, f"{key}.{ext}", image)
            if text is not None:
                _add(tf, f"{key}.txt", text)
        sample("h00", good, hand_caption("h00").encode())
        sample("h01", good[: len(good) // 2], b"corrupt jpeg")
        sample("h02", b"", b"zero byte image")
        sample("h03", _png_header_only(12_000, 12_000), b"bomb", ext="png")
        sample("h04", good)
        sample("h05", good, b"caf\xe9 au lait")
        sample("h06", gray, hand_caption("h06").encode(), ext="png")
        sample("h07", rgba, hand_caption("h07").encode(), ext="png")
        sample("h08", cmyk, hand_caption("h08").encode())
        sample("h09", good, b"  \n ")
        sample("h10", good, b"the last member is cut short" * 20)
    blob = raw.getvalue()
    # Cut inside the final .txt member's data (and drop the end-of-archive blocks).
    cut = blob.index(b"the last member is cut short") + 100
    (hand / "hand.tar").write_bytes(blob[:cut])
    return {"shards": f"{shards}/{{00000..00004}}.tar", "hand": str(hand / "hand.tar"),
            "root": root}


def make_config(urls, batch_size=4, workers=0, seed=0):
    c = config_lib.default_config()
    c.model.image.image_size = 32
    c.data.train.source = "webdataset"
    c.data.train.urls = urls
    c.data.batch_size = batch_size
    c.data.workers = workers
    c.data.threads = 2
    c.train.seed = seed
    return config_lib.validate(c)


def rows_to_captions(tokenizer, captions):
    table = {tokenizer(t)[0].tobytes(): t for t in captions}
    return table


def all_captions():
    return [caption(i) for i in range(N_FOLDER)] + [hand_caption(k) for k in GOOD_HAND]


def collect(p, tokenizer, limit=None):
    table = rows_to_captions(tokenizer, all_captions())
    out = []
    for batch in p:
        assert batch["image"].dtype == np.float32 and batch["text"].dtype == np.int32
        assert batch["image"].shape[1:] == (32, 32, 3)
        out.extend(table[row.tobytes()] for row in batch["text"])
        if limit and len(out) >= limit:
            break
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(config_lib.default_config().model)


def test_expand_urls():
    assert webdataset.expand_urls("/d/{008..011}.tar") == [
        "/d/008.tar", "/d/009.tar", "/d/010.tar", "/d/011.tar"]
    assert webdataset.expand_urls("/a/{0..1}-{x,y}.tar::/b/c.tar") == [
        "/a/0-x.tar", "/a/0-y.tar", "/a/1-x.tar", "/a/1-y.tar", "/b/c.tar"]
    assert webdataset.expand_urls(("/a.tar", "/b/{1..2}.tar")) == ["/a.tar", "/b/1.tar", "/b/2.tar"]
    with pytest.raises(ClipjaxError):
        webdataset.expand_urls(" :: ")


def test_converter_layout(data):
    shard0 = data["shards"].replace("{00000..00004}", "00000")
    with tarfile.open(shard0) as tf:
        names = tf.getnames()
    assert names[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
    sizes = json.loads((data["root"] / "shards" / "sizes.json").read_text())
    assert sizes == {"00000.tar": 5, "00001.tar": 5, "00002.tar": 5, "00003.tar": 5,
                     "00004.tar": 3}
    records = list(webdataset.iter_shard(shard0))
    assert [r["text"].decode() for r in records] == [caption(i) for i in range(5)]
    assert json.loads(records[0]["json"])["source_key"] == "img000.jpg"


def test_hand_tar_index_marks_truncation(data):
    with open(data["hand"], "rb") as f:
        samples, truncated = webdataset.index_tarfile(f, os.path.getsize(data["hand"]))
    assert truncated
    assert [s.key for s in samples] == [f"h{i:02d}" for i in range(11)]
    assert [s.key for s in samples if s.truncated] == ["h10"]


def test_one_epoch_exactly_once_bad_samples_counted(data, tokenizer):
    c = make_config(f"{data['shards']}::{data['hand']}", batch_size=4)
    p = pipeline.build_train_pipeline(c, epochs=1, tokenizer=tokenizer)
    got = collect(p, tokenizer)
    assert sorted(got) == sorted(all_captions())
    assert p.skipped == HAND_SKIPS
    assert len(p.first_bad) == pipeline.LOG_FIRST_BAD
    assert all(k.startswith(data["hand"] + ":h") for k in p.first_bad)
    p.close()


def test_epochs_reshuffle_and_training_stream_runs_on(data, tokenizer):
    c = make_config(data["shards"], batch_size=N_FOLDER)  # one batch = one epoch
    p = pipeline.build_train_pipeline(c, tokenizer=tokenizer)
    epochs = [collect([next(p)], tokenizer) for _ in range(3)]
    for e in epochs:
        assert sorted(e) == sorted(all_captions()[:N_FOLDER])
    assert epochs[0] != epochs[1] != epochs[2]
    p.close()
    # Same seed, same order; another seed, another order.
    again = pipeline.build_train_pipeline(c, tokenizer=tokenizer)
    assert collect([next(again)], tokenizer) == epochs[0]
    again.close()
    other = pipeline.build_train_pipeline(make_config(data["shards"], N_FOLDER, seed=1),
                                          tokenizer=tokenizer)
    assert collect([next(other)], tokenizer) != epochs[0]
    other.close()


def test_two_processes_disjoint_union_is_the_epoch(data, tokenizer):
    c = make_config(f"{data['shards']}::{data['hand']}", batch_size=4)
    seen, skipped = [], {}
    for p_index in range(2):
        p = pipeline.build_train_pipeline(c, process_index=p_index, process_count=2, epochs=1,
                                          tokenizer=tokenizer)
        assert p.batch_size == 2
        seen.append(collect(p, tokenizer))
        for k, v in p.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
        p.close()
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(all_captions())
    assert skipped == HAND_SKIPS
    with pytest.raises(ClipjaxError, match="split evenly"):
        pipeline.build_train_pipeline(make_config(data["shards"], batch_size=3),
                                      process_count=2, tokenizer=tokenizer)


def test_restore_through_orbax_continues_identically(data, tokenizer, tmp_path):
    """Two decode worker processes; the state goes through the trainer's orbax manager."""
    import orbax.checkpoint as ocp

    from clipjax import checkpoint

    c = make_config(f"{data['shards']}::{data['hand']}", batch_size=3, workers=2)
    p = pipeline.build_train_pipeline(c, tokenizer=tokenizer)
    for _ in range(5):
        next(p)
    mgr = checkpoint.manager(str(tmp_path))  # async, as the trainer saves
    mgr.save(5, args=ocp.args.Composite(data=p.save_args()))
    expected = [next(p) for _ in range(6)]  # advancing while the save may still run
    mgr.wait_until_finished()
    skipped_then = dict(p.skipped)
    p.close()

    q = pipeline.build_train_pipeline(c, tokenizer=tokenizer)
    mgr.restore(5, args=ocp.args.Composite(data=q.restore_args()))
    mgr.close()
    got = [next(q) for _ in range(6)]
    q.close()
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a["text"], b["text"])
        np.testing.assert_array_equal(a["image"], b["image"])
    assert q.skipped == skipped_then and sum(q.skipped.values()) > 0


def test_missing_shard_and_empty_source_are_startup_errors(data, tmp_path, tokenizer):
    missing = str(tmp_path / "nope" / "{0..1}.tar")
    with pytest.raises(ClipjaxError, match="shard not found"):
        pipeline.build_train_pipeline(make_config(missing), tokenizer=tokenizer)
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    with pytest.raises(ClipjaxError, match="empty"):
        pipeline.build_train_pipeline(make_config(str(empty)), tokenizer=tokenizer)


def test_unreadable_shard_is_skipped_not_fatal(data, tmp_path, tokenizer):
    bad = tmp_path / "garbage.tar"
    bad.write_bytes(os.urandom(3000))
    c = make_config(f"{data['shards']}::{bad}", batch_size=5)
    p = pipeline.build_train_pipeline(c, epochs=1, tokenizer=tokenizer)
    got = collect(p, tokenizer)
    assert sorted(got) == sorted(all_captions()[:N_FOLDER])
    assert p.skipped == {"unreadable_shard": 1}
    p.close()
    # With a recorded count the shard is found unreadable while reading: each slot is counted.
    (tmp_path / "sizes.json").write_text(json.dumps({"garbage.tar": 4}))
    p = pipeline.build_train_pipeline(c, epochs=1, tokenizer=tokenizer)
    assert sorted(collect(p, tokenizer)) == sorted(all_captions()[:N_FOLDER])
    assert p.skipped == {"unreadable_shard": 4}
    p.close()


def test_in_process_state_roundtrip(data, tokenizer):
    c = make_config(f"{data['shards']}::{data['hand']}", batch_size=4, workers=0)
    p = pipeline.build_train_pipeline(c, tokenizer=tokenizer)
    for _ in range(4):
        next(p)
    state = json.loads(json.dumps(p.get_state()))  # what grain's handler writes
    expected = [next(p)["text"] for _ in range(5)]
    p.close()
    q = pipeline.build_train_pipeline(c, tokenizer=tokenizer)
    q.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(q)["text"], want)
    q.close()


def test_remote_paths_through_fsspec_and_index_cache(data, tokenizer, tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    local = sorted((data["root"] / "shards").glob("*.tar"))
    for path in local:
        fs.pipe(f"/remote/{path.name}", path.read_bytes())
    c = make_config(f"memory://remote/{{00000..{len(local) - 1:05d}}}.tar", batch_size=5)
    c.data.index_cache = str(tmp_path / "index")
    p = pipeline.build_train_pipeline(c, epochs=1, tokenizer=tokenizer)
    assert sorted(collect(p, tokenizer)) == sorted(all_captions()[:N_FOLDER])
    p.close()
    assert len(list((tmp_path / "index").glob("*.json"))) == len(local)  # no sizes.json: scanned
    url = f"memory://remote/{local[0].name}"
    cached = webdataset.index_shard(url, str(tmp_path / "index"))  # read back from the cache
    assert cached == webdataset.index_shard(url) and len(cached) == 5
    fs.pipe("/remote/sizes.json", json.dumps({p.name: 5 for p in local}).encode())
    assert webdataset.known_sizes([f"memory://remote/{local[0].name}"]) == {
        f"memory://remote/{local[0].name}": 5}
    fs.rm("/remote", recursive=True)


def test_missing_remote_shard_is_named():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/listed/00000.tar", b"x")
    with pytest.raises(ClipjaxError, match="memory://listed/00001.tar"):
        webdataset.check_urls_exist(["memory://listed/00000.tar", "memory://listed/00001.tar"])
    webdataset.check_urls_exist(["memory://listed/00000.tar"])
    fs.rm("/listed", recursive=True)
