"""Batches independent of the host count and of data.workers / data.threads, with every
augmentation on: random resized crop, flip and a random caption per sample."""

import io
import json
import tarfile

import numpy as np
import pytest
from images import jpeg

from clipjax import config as config_lib
from clipjax.data import pipeline, sources
from clipjax.data.tokenizers import build_tokenizer
from clipjax.data.transform import sample_rng
from clipjax.errors import ClipjaxError

N_SHARDS, PER_SHARD = 3, 7  # 21 samples: batches cross shard and epoch boundaries




def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards whose captions hold three lines each: caption_choice=random picks one."""
    d = tmp_path_factory.mktemp("global_order")
    rng = np.random.default_rng(0)
    for s in range(N_SHARDS):
        with tarfile.open(d / f"{s:05d}.tar", "w") as tf:
            for i in range(PER_SHARD):
                key = f"{s}{i:03d}"
                _add(tf, f"{key}.jpg", jpeg(rng, 40 + i, 52 - i))
                _add(tf, f"{key}.txt", "\n".join(
                    f"{v} caption of sample {key}" for v in ("first", "second", "third")
                ).encode())
    (d / "sizes.json").write_text(json.dumps({f"{s:05d}.tar": PER_SHARD
                                              for s in range(N_SHARDS)}))
    return f"{d}/{{00000..{N_SHARDS - 1:05d}}}.tar"


def make_config(urls, batch_size=8, workers=0, threads=2, prefetch=2):
    c = config_lib.default_config()
    c.model.image.image_size = 32
    c.data.train.source = "webdataset"
    c.data.train.urls = urls
    c.data.train.caption_lines = True
    c.data.train.caption_choice = "random"
    c.data.augment.crop_scale = (0.25, 1.0)
    c.data.augment.flip = True
    c.data.batch_size = batch_size
    c.data.workers, c.data.threads, c.data.prefetch = workers, threads, prefetch
    c.train.seed = 5
    return config_lib.validate(c)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(config_lib.default_config().model)


def take(p, n):
    out = [next(p) for _ in range(n)]
    p.close()
    return out


def test_two_processes_concatenated_equal_one_process(shards, tokenizer):
    c = make_config(shards, batch_size=8)
    steps = 6  # 48 samples: two epochs and a bit
    single = take(pipeline.build_train_pipeline(c, tokenizer=tokenizer), steps)
    halves = [take(pipeline.build_train_pipeline(c, process_index=p, process_count=2,
                                                 tokenizer=tokenizer), steps)
              for p in range(2)]
    quarters = [take(pipeline.build_train_pipeline(c, process_index=p, process_count=4,
                                                   tokenizer=tokenizer), steps)
                for p in range(4)]
    for k in range(steps):
        for parts in (halves, quarters):
            for key in ("image", "text"):
                np.testing.assert_array_equal(
                    np.concatenate([part[k][key] for part in parts]), single[k][key])
    # The augmentation is really on: the same sample is cropped, flipped and captioned
    # differently from epoch to epoch, and all three captions get picked.
    texts = {tokenizer(t)[0].tobytes(): t for s in range(N_SHARDS) for i in range(PER_SHARD)
             for t in (f"{v} caption of sample {s}{i:03d}" for v in ("first", "second", "third"))}
    seen = [texts[r.tobytes()] for b in single for r in b["text"]]
    assert {t.split()[0] for t in seen} == {"first", "second", "third"}
    assert len({t.split()[-1] for t in seen}) == N_SHARDS * PER_SHARD


def test_draws_depend_on_seed_epoch_and_position_only():
    a, b = sample_rng((5, 0, 3)), sample_rng((5, 0, 3))
    assert a.random() == b.random()
    assert sample_rng((5, 1, 3)).random() != sample_rng((5, 0, 3)).random()
    assert sample_rng((5, 0, 4)).random() != sample_rng((5, 0, 3)).random()
    assert sample_rng((6, 0, 3)).random() != sample_rng((5, 0, 3)).random()


def test_block_layout_of_process_streams():
    class Counting(sources.Source):
        name = "counting"

        def __init__(self, n):
            super().__init__()
            self.sizes = [n]

        def read(self, shard, i):
            return {"i": i}

    src = Counting(10)
    # Finite: 2 processes x blocks of 3 over 10 samples -> [0..2, 6..8], [3..5, 9].
    streams = [sources.ProcessStream(src, seed=0, process_index=p, process_count=2, epochs=1,
                                     shuffle=False, block=3) for p in range(2)]
    assert [[s[i]["_pos"] for i in range(len(s))] for s in streams] == [
        [0, 1, 2, 6, 7, 8], [3, 4, 5, 9]]
    assert streams[1][3]["_draw"] == (0, 0, 9)
    one = sources.ProcessStream(src, seed=0, epochs=2, shuffle=False, block=3)
    assert len(one) == 20 and one[13]["_draw"] == (0, 1, 3)


def test_workers_and_threads_change_nothing_and_resume_across_them(shards, tokenizer):
    """The batches and the saved state are the same for any data.workers / data.threads:
    a state saved with 2 worker processes resumes in-process, and the other way round."""
    base = make_config(shards, batch_size=4, workers=0, threads=2)
    want = take(pipeline.build_train_pipeline(base, tokenizer=tokenizer), 7)

    p = pipeline.build_train_pipeline(make_config(shards, batch_size=4, workers=2, threads=1,
                                                  prefetch=1), tokenizer=tokenizer)
    got = [next(p) for _ in range(3)]
    state = json.loads(json.dumps(p.get_state()))  # what grain's handler writes
    p.close()
    assert sorted(state) == ["batch_size", "first_bad", "next_record", "process_count",
                             "process_index", "skipped"]
    assert state["next_record"] == 12

    q = pipeline.build_train_pipeline(make_config(shards, batch_size=4, workers=0, threads=0,
                                                  prefetch=0), tokenizer=tokenizer)
    assert sorted(q.get_state()) == sorted(state)
    q.set_state(state)
    got += take(q, 4)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["text"], b["text"])

    other = pipeline.build_train_pipeline(make_config(shards, batch_size=8), tokenizer=tokenizer)
    with pytest.raises(ClipjaxError, match="batch_size=4"):
        other.set_state(state)
    with pytest.raises(ClipjaxError, match="older clipjax"):
        other.set_state({"inner": {"next_index": 3}, "skipped": {}, "first_bad": []})
    other.close()
