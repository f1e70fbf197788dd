"""Zero-shot evaluation throughput: clipjax's evaluator path vs open_clip, same model, same data.

    python benchmarks/eval_throughput.py                 # 1,024 Fashion-MNIST test images
    python benchmarks/eval_throughput.py --images 10000 --batch-size 256

Both sides run the `bench_s` architecture (configs/bench_s.py: ViT 64px/8, width
384, 6 layers; text 32 tokens, width 256, 6 layers; embed 256) with the SAME
weights: a random open_clip model is imported with `clipjax.interop.open_clip`.
Each side does a whole zero-shot evaluation: the prompt-ensembled classifier from
the built-in Fashion-MNIST class names and templates, then every image decoded,
resized (28 → 64 px, bicubic), normalised, encoded and scored, top-1 counted.
clipjax runs what `clipjax eval` runs (`evaluate.encoder.Encoder` over
`ClipModel`); open_clip runs its own `build_zero_shot_classifier` and a
torch.inference_mode loop with its eval transform, at its best thread setting.
One warm-up pass first (clipjax compiles there); the median of `--repeats` timed
passes is reported. Both run in this process, under the same allocator (tcmalloc
when installed, as the `clipjax` CLI uses), with the XLA CPU flags `clipjax eval`
sets (YNNPACK fusions off: see `evaluate.encoder.tune_cpu_flags`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import timed  # noqa: E402

from clipjax import runtime  # noqa: E402

FASHION = "/usr/share/datasets/fashion-mnist"


def _reexec_with_fast_allocator() -> None:
    """What `clipjax` does at start on CPU: pin JAX to the CPU, re-exec under tcmalloc."""
    if runtime._accelerator_present():
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    extra = runtime.allocator_env()
    if extra:
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, **extra))


def bench_s_open_clip_config() -> dict:
    """configs/bench_s.py as an open_clip model config (the import maps it back)."""
    from configs.bench_s import get_config

    m = get_config().model
    return {
        "embed_dim": m.embed_dim, "quick_gelu": m.act == "quick_gelu",
        "vision_cfg": {"image_size": m.image.image_size, "layers": m.image.layers,
                       "width": m.image.width, "head_width": m.image.width // m.image.heads,
                       "patch_size": m.image.patch_size, "mlp_ratio": m.image.mlp_ratio},
        "text_cfg": {"context_length": m.text.context_length, "vocab_size": m.text.vocab_size,
                     "width": m.text.width, "heads": m.text.heads, "layers": m.text.layers,
                     "mlp_ratio": m.text.mlp_ratio},
    }


def load_images(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    from clipjax.evaluate import datasets

    if os.path.exists(os.path.join(FASHION, "t10k-images-idx3-ubyte.gz")):
        src = datasets.idx_source(FASHION, "test")
        pairs = [p for _, p in zip(range(n), src, strict=False)]
        images = np.stack([im for im, _ in pairs])
        labels = np.array([y for _, y in pairs])
        return images, labels, f"Fashion-MNIST test[:{len(labels)}]"
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n),
            f"{n} random 28x28 images (install dataset-fashion-mnist for real ones)")


def run_clipjax(config, params, images, labels, classnames, templates, batch_size):
    from clipjax.evaluate import encoder, zeroshot

    enc = encoder.Encoder(config, params, batch_size=batch_size)

    def once():
        clf = zeroshot.build_classifier(enc.encode_texts, classnames, templates)
        acc = zeroshot.Accumulator(len(classnames))
        for emb, y in enc.encode_examples(zip(images, labels.tolist(), strict=True)):
            acc.update(zeroshot.logits(emb, clf), np.asarray(y))
        return acc.metrics()["top1"]

    return once


def run_open_clip(open_clip, model, images, labels, classnames, templates, batch_size,
                  context_length):
    import torch
    from PIL import Image

    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    tokenizer = lambda texts: open_clip.tokenize(texts, context_length)

    def once():
        with torch.inference_mode():
            clf = open_clip.build_zero_shot_classifier(
                model, tokenizer=tokenizer, classnames=classnames, templates=templates,
                num_classes_per_batch=10, device="cpu")
            correct = 0
            for i in range(0, len(labels), batch_size):
                batch = torch.stack([preprocess(Image.fromarray(im))
                                     for im in images[i:i + batch_size]])
                feats = model.encode_image(batch, normalize=True)
                pred = (100.0 * feats @ clf).topk(1, 1, True, True)[1][:, 0]
                correct += int((pred == torch.from_numpy(labels[i:i + batch_size])).sum())
        return correct / len(labels)

    return once


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64,
                   help="both sides (CPU: 16-64 beats 256 for both, by cache reuse)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--torch-threads", default="auto",
                   help="torch intra-op threads; 'auto' times 1 and all cores, keeps the best")
    args = p.parse_args()
    _reexec_with_fast_allocator()
    from clipjax.evaluate.xla_flags import tune_cpu_flags

    tune_cpu_flags()  # what `clipjax eval` sets on CPU

    import jax
    import torch

    from clipjax.evaluate import prompts
    from clipjax.interop import peer
    from clipjax.interop.open_clip import import_open_clip

    open_clip = peer.open_clip()
    oc_cfg = bench_s_open_clip_config()
    torch.manual_seed(0)
    model = open_clip.CLIP(oc_cfg["embed_dim"], open_clip.CLIPVisionCfg(**oc_cfg["vision_cfg"]),
                           open_clip.CLIPTextCfg(**oc_cfg["text_cfg"]),
                           quick_gelu=oc_cfg["quick_gelu"]).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench_s.pt")
        torch.save(model.state_dict(), path)
        params, config = import_open_clip(path, oc_cfg)

    images, labels, what = load_images(args.images)
    classnames = prompts.load_classnames("fashion_mnist")
    templates = prompts.load_templates("fashion_mnist")
    n = len(labels)

    rows = []
    jx = run_clipjax(config, params, images, labels, classnames, templates, args.batch_size)
    secs, cpu, top1 = timed(jx, args.repeats)
    d = jax.devices()[0]
    rows.append((f"clipjax ({len(jax.devices())}x {d.platform})", secs, cpu, top1))

    threads = ([1, os.cpu_count() or 1] if args.torch_threads == "auto"
               else [int(args.torch_threads)])
    best = best_cpu = None
    for t in sorted(set(threads)):
        torch.set_num_threads(t)
        oc = run_open_clip(open_clip, model, images, labels, classnames, templates,
                           args.batch_size, oc_cfg["text_cfg"]["context_length"])
        secs_oc, cpu_oc, top1_oc = timed(oc, args.repeats)
        rows.append((f"open_clip (torch, {t} thread{'s' if t > 1 else ''})", secs_oc, cpu_oc,
                     top1_oc))
        best = secs_oc if best is None else min(best, secs_oc)
        best_cpu = cpu_oc if best_cpu is None else min(best_cpu, cpu_oc)

    alloc = os.environ.get("CLIPJAX_ALLOCATOR_SET") or (
        "LD_PRELOAD" if "LD_PRELOAD" in os.environ else "glibc")
    print(f"\nzero-shot eval, bench_s, {what}, {len(classnames)} classes x {len(templates)} "
          f"templates, batch {args.batch_size}, allocator {alloc}, median of {args.repeats}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} CPUs, load average {load:.1f} at the end (wall-clock "
          "numbers assume an otherwise idle machine; CPU-seconds are robust to other load)")
    print(f"{'implementation':<32} {'wall s':>7} {'images/s':>9} {'CPU s':>7} "
          f"{'images/CPU-s':>12} {'top-1':>7}")
    for name, s, c, acc in rows:
        print(f"{name:<32} {s:>7.2f} {n / s:>9.1f} {c:>7.2f} {n / c:>12.1f} {100 * acc:>6.2f}%")
    print(f"clipjax vs best open_clip: {best / secs:.2f}x images/s, "
          f"{best_cpu / cpu:.2f}x images per CPU-second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
