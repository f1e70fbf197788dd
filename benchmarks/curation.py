"""Pairs scored per second: `clipjax data score` vs open_clip's encode loop, same model and shards.

    python benchmarks/curation.py                    # 2,048 Fashion-MNIST test pairs
    python benchmarks/curation.py --pairs 4096 --image-px 256 --batch-size 128

Both sides run the `bench_s` architecture (configs/bench_s.py) with the SAME
weights: a random open_clip model is saved as a PyTorch state_dict and brought in
with `clipjax import open_clip`, as a user would. The shards are Fashion-MNIST
test images with class captions, written by `clipjax data convert` (28 px PNG),
or with `--image-px N` upscaled and stored as JPEG (quality 90) like web data.
Each side does the whole job per pair: read the sample from the tar, decode the
image, resize / crop / normalise it, tokenize the caption, embed both, cosine.
clipjax runs `curation.score.score_shards` (what `clipjax data score` runs:
decode threads one chunk ahead of the jitted encoders, tables written); open_clip
runs a torch.inference_mode loop with its own eval transform and tokenizer over
the same records, at its best thread setting. One warm-up pass each first (clipjax
compiles there); the median of `--repeats` timed passes is reported. Both run in
this process, under the same allocator (tcmalloc when installed, as the `clipjax`
CLI uses).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from eval_throughput import (  # noqa: E402
    FASHION,
    _reexec_with_fast_allocator,
    bench_s_open_clip_config,
)
from timing import timed  # noqa: E402


def write_shards(root: str, pairs: int, image_px: int, shard_size: int) -> list[str]:
    """Fashion-MNIST test pairs as shards: `data convert` as is, or upscaled JPEGs."""
    from PIL import Image

    from clipjax import cli
    from clipjax.data import idx
    from clipjax.data.convert import ShardWriter

    out = os.path.join(root, "shards")
    if not image_px:
        argv = ["data", "convert", "--from", "idx", FASHION, "--split", "test", "--out", out,
                "--shard-size", str(shard_size), "--limit", str(pairs), "--image-format",
                "png", "--template", "a photo of a {}."]
        if cli.main(argv):
            raise SystemExit("data convert failed")
    else:
        images, labels = idx.load_split(FASHION, "test")
        writer = ShardWriter(out, shard_size)
        for im, y in zip(images[:pairs], labels[:pairs]):
            buf = io.BytesIO()
            Image.fromarray(im).convert("RGB").resize((image_px, image_px), Image.BICUBIC) \
                .save(buf, "JPEG", quality=90)
            writer.write(buf.getvalue(), f"a photo of a {idx.FASHION_MNIST_CLASSES[y]}.")
        writer.close()
    names = sorted(n for n in os.listdir(out) if n.endswith(".tar"))
    return [os.path.join(out, n) for n in names]


def run_clipjax(model, urls, batch_size, root):
    from clipjax.curation import score

    def once():
        out = os.path.join(root, "scores")
        shutil.rmtree(out, ignore_errors=True)
        report = score.score_shards(model, urls, out, batch_size=batch_size)
        return report.pairs

    return once


def run_open_clip(open_clip, model, urls, batch_size, context_length):
    import torch
    from PIL import Image

    from clipjax.data import webdataset as wds

    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)

    def embed(images, captions):
        x = torch.stack([preprocess(im) for im in images])
        t = open_clip.tokenize(captions, context_length)
        a = model.encode_image(x, normalize=True)
        b = model.encode_text(t, normalize=True)
        return (a * b).sum(-1)

    def once():
        n = 0
        with torch.inference_mode():
            for url in urls:
                images, captions, scores = [], [], []
                for rec in wds.iter_shard(url):
                    images.append(Image.open(io.BytesIO(rec["image"])).convert("RGB"))
                    captions.append(rec["text"].decode("utf-8").splitlines()[0])
                    if len(images) == batch_size:
                        scores.append(embed(images, captions))
                        n += len(images)
                        images, captions = [], []
                if images:
                    scores.append(embed(images, captions))
                    n += len(images)
        return n

    return once


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=2048)
    p.add_argument("--image-px", type=int, default=0,
                   help="store images upscaled to N px as JPEG (0: 28 px PNG from convert)")
    p.add_argument("--shard-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--torch-threads", default="auto",
                   help="torch intra-op threads; 'auto' times 1 and all cores, keeps the best")
    args = p.parse_args()
    if not os.path.exists(os.path.join(FASHION, "t10k-images-idx3-ubyte.gz")):
        raise SystemExit(f"needs Fashion-MNIST in {FASHION} (Debian's dataset-fashion-mnist)")
    _reexec_with_fast_allocator()

    import jax
    import torch

    from clipjax import cli, inference
    from clipjax.interop import peer

    open_clip = peer.open_clip()
    oc_cfg = bench_s_open_clip_config()
    torch.manual_seed(0)
    model = open_clip.CLIP(oc_cfg["embed_dim"], open_clip.CLIPVisionCfg(**oc_cfg["vision_cfg"]),
                           open_clip.CLIPTextCfg(**oc_cfg["text_cfg"]),
                           quick_gelu=oc_cfg["quick_gelu"]).eval()
    root = tempfile.mkdtemp(prefix="clipjax-curation-bench-")
    try:
        import json

        ckpt = os.path.join(root, "bench_s.pt")
        torch.save(model.state_dict(), ckpt)
        workdir = os.path.join(root, "model")
        if cli.main(["import", "open_clip", "--checkpoint", ckpt, "--model-config",
                     json.dumps(oc_cfg), "--workdir", workdir]):
            raise SystemExit("clipjax import failed")
        jmodel = inference.load(workdir, batch_size=args.batch_size)
        urls = write_shards(root, args.pairs, args.image_px, args.shard_size)

        rows = []
        secs, cpu, n = timed(run_clipjax(jmodel, urls, args.batch_size, root), args.repeats)
        rows.append((f"clipjax data score ({len(jax.devices())}x "
                     f"{jax.devices()[0].platform})", secs, cpu, n))
        print(f"measured: {rows[-1]}", flush=True)
        threads = ([1, os.cpu_count() or 1] if args.torch_threads == "auto"
                   else [int(args.torch_threads)])
        best = best_cpu = None
        for t in sorted(set(threads)):
            torch.set_num_threads(t)
            oc = run_open_clip(open_clip, model, urls, args.batch_size,
                               oc_cfg["text_cfg"]["context_length"])
            s, c, n_oc = timed(oc, args.repeats)
            rows.append((f"open_clip loop (torch, {t} thread{'s' if t > 1 else ''})", s, c,
                         n_oc))
            print(f"measured: {rows[-1]}", flush=True)
            best = s if best is None else min(best, s)
            best_cpu = c if best_cpu is None else min(best_cpu, c)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    alloc = os.environ.get("CLIPJAX_ALLOCATOR_SET") or (
        "LD_PRELOAD" if "LD_PRELOAD" in os.environ else "glibc")
    what = f"{args.image_px} px JPEG" if args.image_px else "28 px PNG (data convert)"
    print(f"\nscoring pairs, bench_s, {n} Fashion-MNIST test pairs as {what} in "
          f"{len(urls)} shards, batch {args.batch_size}, allocator {alloc}, "
          f"median of {args.repeats}")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'implementation':<36} {'wall s':>7} {'pairs/s':>9} {'CPU s':>7} "
          f"{'pairs/CPU-s':>11}")
    for name, s, c, k in rows:
        print(f"{name:<36} {s:>7.2f} {k / s:>9.1f} {c:>7.2f} {k / c:>11.1f}")
    print(f"clipjax vs best open_clip: {best / secs:.2f}x pairs/s, "
          f"{best_cpu / cpu:.2f}x pairs per CPU-second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
