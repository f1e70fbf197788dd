"""Input pipeline throughput: clipjax (grain) vs open_clip's webdataset pipeline.

Both read the same local webdataset shards of 256x256 JPEGs (scikit-image's
photos, randomly cropped and resized), decode, random-resized-crop to 224
(scale 0.9-1.0, bicubic), normalise and tokenize (CLIP BPE, 77 tokens), and
batch. open_clip_train is not installed here, so the peer is its
`get_wds_dataset` (non-resampled branch) rebuilt from the same webdataset
stages with `open_clip.image_transform(224, is_train=True)` and its tokenizer,
in a torch DataLoader (`WebLoader`) with the same number of workers.

    .venv/bin/python benchmarks/input_pipeline.py [--images 1536] [--batches 24]

Prints images/s by number of worker processes (each worker is one core's work
when clipjax's data.threads = 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_shards(out_dir: str, n: int, shard_size: int = 256) -> str:
    """n 256x256 JPEGs cut from scikit-image's photos, with short captions."""
    import skimage.data
    from PIL import Image

    from clipjax.data.convert import ShardWriter

    photos = [getattr(skimage.data, name)() for name in (
        "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
        "retina", "camera", "cat", "colorwheel", "coins", "moon", "brick")]
    photos = [Image.fromarray(p).convert("RGB") for p in photos]
    words = ("a photo of", "an image showing", "close-up of", "the", "red", "small", "old",
             "cat", "rocket", "coffee cup", "astronaut", "galaxy", "motorbike", "in space")
    rng = np.random.default_rng(0)
    writer = ShardWriter(out_dir, shard_size)
    for i in range(n):
        p = photos[i % len(photos)]
        w, h = p.size
        s = int(min(w, h) * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        img = p.resize((256, 256), Image.Resampling.BICUBIC, box=(x, y, x + s, y + s))
        caption = " ".join(rng.choice(words, size=int(rng.integers(4, 12))))
        writer.write(np.asarray(img), caption)
    names = writer.close()
    return f"{out_dir}/{{00000..{len(names) - 1:05d}}}.tar"


def clipjax_rate(urls: str, workers: int, threads: int, batch: int, batches: int) -> float:
    from clipjax import config as config_lib
    from clipjax.data import pipeline

    c = config_lib.default_config()
    c.data.train.source = "webdataset"
    c.data.train.urls = urls
    c.data.batch_size = batch
    c.data.workers = workers
    c.data.threads = threads
    c.data.prefetch = 2
    c = config_lib.validate(c)
    p = pipeline.build_train_pipeline(c)
    try:
        for _ in range(2):  # start-up: worker spawn, tokenizer load
            next(p)
        t = time.perf_counter()
        for _ in range(batches):
            b = next(p)
        dt = time.perf_counter() - t
        assert b["image"].shape == (batch, 224, 224, 3) and b["text"].shape == (batch, 77)
    finally:
        p.close()
    return batches * batch / dt


def open_clip_rate(urls: str, workers: int, batch: int, batches: int) -> float:
    """open_clip_train.data.get_wds_dataset's pipeline, built from open_clip's pieces."""
    import torch
    import webdataset as wds

    from clipjax.interop import peer

    open_clip = peer.open_clip()
    preprocess = open_clip.image_transform(224, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")

    def has_caption_and_image(sample):
        return "txt" in sample and any(k in sample for k in ("png", "jpg", "jpeg", "webp"))

    dataset = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.detshuffle(bufsize=2000, initial=500, seed=0),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(bufsize=5000, initial=1000),
        wds.select(has_caption_and_image),
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]),
        wds.to_tuple("image", "text"),
        wds.batched(batch, partial=False),
    )
    loader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                           persistent_workers=workers > 0)
    torch.set_num_threads(1)

    def forever():
        while True:
            yield from loader

    it = forever()
    for _ in range(2):
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        images, texts = next(it)
    dt = time.perf_counter() - t
    assert tuple(images.shape) == (batch, 3, 224, 224) and tuple(texts.shape) == (batch, 77)
    return batches * batch / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1536)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=24, help="timed batches per run")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeats", type=int, default=2, help="best of N runs")
    args = ap.parse_args()
    from clipjax.interop import peer

    workers = [int(w) for w in args.workers.split(",")]
    have_peer = peer.available()
    try:
        import webdataset  # noqa: F401
    except ImportError:
        have_peer = False
    with tempfile.TemporaryDirectory() as d:
        urls = make_shards(d, args.images)
        rows = []
        for w in workers:
            ours = max(clipjax_rate(urls, w, 1, args.batch, args.batches)
                       for _ in range(args.repeats))
            theirs = (max(open_clip_rate(urls, w, args.batch, args.batches)
                          for _ in range(args.repeats)) if have_peer else float("nan"))
            rows.append((f"{w} worker{'s' if w > 1 else ''}, 1 thread each", ours, theirs, w))
        inproc = max(clipjax_rate(urls, 0, os.cpu_count() or 1, args.batch, args.batches)
                     for _ in range(args.repeats))
    print(f"\ninput pipeline, {os.cpu_count()} CPU cores: decode 256px JPEG + random resized "
          f"crop 224 + normalise + tokenize, batch {args.batch}")
    print(f"| {'setting':<30} | {'clipjax img/s':>13} | {'open_clip img/s':>15} | "
          f"{'ratio':>5} | {'clipjax img/s/worker':>20} |")
    print(f"|{'-' * 32}|{'-' * 14}:|{'-' * 16}:|{'-' * 6}:|{'-' * 21}:|")
    for name, ours, theirs, w in rows:
        print(f"| {name:<30} | {ours:>13.0f} | {theirs:>15.0f} | {ours / theirs:>5.2f} | "
              f"{ours / w:>20.0f} |")
    print(f"| {'in-process, threads = cores':<30} | {inproc:>13.0f} | {'-':>15} | {'-':>5} | "
          f"{'-':>20} |")


if __name__ == "__main__":
    main()
