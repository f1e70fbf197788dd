"""Training throughput of the bench_s CLIP: clipjax vs open_clip (torch) on this machine.

    .venv/bin/python benchmarks/train_throughput.py [--steps 10] [--warmup 3]

Each side runs in its own subprocess, under glibc malloc and under tcmalloc
(LD_PRELOAD), on the same model (configs/bench_s.py: ViT 64 px / patch 8 /
width 384 / 6 layers / 6 heads / MLP 1536; text context 32 / vocab 49,408 /
width 256 / 4 heads / 6 layers; embed 256), the same global batch (128), the
same optimizer (AdamW, weight decay off biases/norms/embeddings, clip 1.0),
float32, on random fixed batches (input pipeline excluded on both sides).
`--patch-dropout P` measures each side at FLIP patch dropout 0 and P in the same run
(clipjax: `model.image.patch_dropout`; open_clip: `CLIPVisionCfg.patch_dropout`) and
prints the speed-up.
clipjax runs the exact jitted step `clipjax train` runs. MFU = analytic FLOPs of
the work each side does (clipjax.models.flops: open_clip runs every token through
the last blocks, clipjax only the pooled one) over the peak FLOP/s of a 2048²
float32 matmul measured here. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _load_config(overrides=()):
    from clipjax import config as config_lib

    return config_lib.load(os.path.join(REPO, "configs", "bench_s.py"), list(overrides))


def _summary(times: list[float], batch: int, flops: float, peak: float) -> dict:
    median = statistics.median(times)
    return {"step_time": median, "step_time_min": min(times), "samples_per_sec": batch / median,
            "mfu": flops / median / peak, "steps": len(times)}


# --------------------------------------------------------------------------- clipjax side


def clipjax_worker(args) -> dict:
    import jax
    import numpy as np

    from clipjax import metrics
    from clipjax.data.pipeline import build_train_pipeline
    from clipjax.train import program as program_lib

    config = _load_config(args.override)
    program = program_lib.build(config)
    state = program.init()
    pipeline = build_train_pipeline(config, workers=0, normalize=False)  # as the trainer
    batches = [program.global_batch(next(pipeline)) for _ in range(2)]
    t0 = time.perf_counter()
    step = program.lower(state).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        state, out = step(state, batches[i % 2])
        jax.block_until_ready(out["loss"])
        times.append(time.perf_counter() - t0)
    assert np.isfinite(float(out["loss"]))
    flops = metrics.model_flops_per_step(config)
    peak = args.peak or metrics.measure_peak_flops(seconds=2.0)
    return {"compile_s": compile_s, "peak_flops": peak, "model_flops_per_step": flops,
            "devices": jax.device_count(), "loss": float(out["loss"]),
            **_summary(times[args.warmup:], config.data.batch_size, flops, peak)}


# --------------------------------------------------------------------------- open_clip side


def open_clip_worker(args) -> dict:
    import torch

    from clipjax import metrics
    from clipjax.interop import peer

    config = _load_config(args.override)
    m, img = config.model, config.model.image
    oc = peer.open_clip()
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = oc.CLIP(
        m.embed_dim,
        CLIPVisionCfg(layers=img.layers, width=img.width, head_width=img.width // img.heads,
                      mlp_ratio=img.mlp_ratio, patch_size=img.patch_size,
                      image_size=img.image_size, patch_dropout=float(img.patch_dropout)),
        CLIPTextCfg(context_length=m.text.context_length, vocab_size=m.text.vocab_size,
                    width=m.text.width, heads=m.text.heads, layers=m.text.layers,
                    mlp_ratio=m.text.mlp_ratio),
        quick_gelu=m.act == "quick_gelu")
    model.train()
    # open_clip's training script: no weight decay on gains, biases and logit scale.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    o = config.optim
    opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                             {"params": decay, "weight_decay": o.weight_decay}],
                            lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    loss_fn = oc.ClipLoss()
    b = config.data.batch_size
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(b, 3, img.image_size, img.image_size, generator=gen),
                torch.randint(1, m.text.vocab_size, (b, m.text.context_length), generator=gen))
               for _ in range(2)]
    times = []
    for i in range(args.warmup + args.steps):
        images, texts = batches[i % 2]
        t0 = time.perf_counter()
        image_features, text_features, logit_scale = model(images, texts)
        loss = loss_fn(image_features, text_features, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        opt.step()
        times.append(time.perf_counter() - t0)
    flops = metrics.model_flops_per_step(config, pooled_last=False)  # it computes every token
    peak = args.peak or metrics.measure_peak_flops(seconds=2.0)
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "loss": float(loss), "peak_flops": peak,
            **_summary(times[args.warmup:], b, flops, peak)}


# --------------------------------------------------------------------------- driver


def _run(side: str, allocator: str, args, peak: float = 0.0, dropout: float = 0.0) -> dict:
    from clipjax import runtime

    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", "CLIPJAX_ALLOCATOR_SET")}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    if allocator == "tcmalloc":
        lib = runtime.find_tcmalloc()
        if lib is None:
            return {"error": "libtcmalloc_minimal.so.4 not installed "
                             "(apt-get install libtcmalloc-minimal4)"}
        env["LD_PRELOAD"] = lib
    cmd = [sys.executable, __file__, "--worker", side, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--peak", str(peak)]
    cmd += [f"--override={o}" for o in args.override]
    if dropout:
        cmd.append(f"--override=--config.model.image.patch_dropout={dropout}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (incl. compile)")
    p.add_argument("--worker", choices=("clipjax", "open_clip"), help=argparse.SUPPRESS)
    p.add_argument("--peak", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--override", action="append", default=[],
                   help="config override for both sides, e.g. "
                        "--override=--config.data.batch_size=64")
    p.add_argument("--no-peer", action="store_true", help="measure clipjax only")
    p.add_argument("--patch-dropout", type=float, default=0.0, metavar="P",
                   help="also run every side with FLIP patch dropout P (0 < P < 1) and print "
                        "the speed-up over dropout 0, measured in the same run")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the whole sequence N times, interleaved, and keep each run's best "
                        "(the fastest median): a shared machine's noise only slows runs down")
    p.add_argument("--sides", default="clipjax:tcmalloc,clipjax:glibc,open_clip:glibc,"
                   "open_clip:tcmalloc", help="comma-separated side:allocator runs, in order")
    args = p.parse_args(argv)
    if args.worker:
        fn = clipjax_worker if args.worker == "clipjax" else open_clip_worker
        print(json.dumps(fn(args)), flush=True)
        return 0

    from clipjax.interop import peer

    runs = [(*s.split(":"), 0.0) for s in args.sides.split(",") if s]
    if args.no_peer or not peer.available():
        runs = [r for r in runs if r[0] == "clipjax"]
    if args.patch_dropout:
        if not 0 < args.patch_dropout < 1:
            p.error(f"--patch-dropout must be in (0, 1); got {args.patch_dropout}")
        runs = [r for side, alloc, _ in runs for r in ((side, alloc, 0.0),
                                                       (side, alloc, args.patch_dropout))]
    print(f"bench_s training step, batch 128, float32, {os.cpu_count()} CPUs; "
          f"load average before: {_load()}", flush=True)
    best: dict[tuple, dict] = {}
    peak = 0.0
    for rep in range(args.repeat):
        for key in runs:
            side, allocator, dropout = key
            r = _run(side, allocator, args, peak, dropout)
            peak = peak or r.get("peak_flops", 0.0)
            old = best.get(key)
            if old is None or r.get("samples_per_sec", 0) > old.get("samples_per_sec", 0):
                best[key] = r
            print(f"  [{rep + 1}/{args.repeat}] {side:9s} {allocator:8s} dropout {dropout:.2f} "
                  f"{r.get('samples_per_sec', 0):6.1f} samples/s, load {_load()}", flush=True)
    print(f"load average after: {_load()}; matmul peak {peak / 1e9:.0f} GFLOP/s\n")
    best_peer = max((r["samples_per_sec"] for (s, _, d), r in best.items()
                     if s == "open_clip" and not d and "samples_per_sec" in r), default=0.0)
    header = (f"| {'implementation':23s} | {'allocator':9s} | patch dropout | samples/s "
              f"| step s (median/min) |  MFU  | vs open_clip best | vs dropout 0 |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for key in runs:
        side, allocator, dropout = key
        r = best[key]
        name = "clipjax (jax)" if side == "clipjax" else "open_clip 3.3.0 (torch)"
        if "error" in r:
            print(f"| {name:23s} | {allocator:9s} | {dropout:13.2f} | error: {r['error']}")
            continue
        ratio = f"{r['samples_per_sec'] / best_peer:.2f}x" if best_peer else "n/a"
        base = best.get((side, allocator, 0.0), {}).get("samples_per_sec")
        speedup = f"{r['samples_per_sec'] / base:.2f}x" if base else "n/a"
        print(f"| {name:23s} | {allocator:9s} | {dropout:13.2f} | {r['samples_per_sec']:9.1f} | "
              f"{r['step_time']:8.2f} / {r['step_time_min']:5.2f}    | {r['mfu']:5.1%} | "
              f"{ratio:>17s} | {speedup:>12s} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
