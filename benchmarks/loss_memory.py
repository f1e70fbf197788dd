"""Per-device memory and time of the contrastive loss + gradient: dense grows with B, ring is flat.

For every kind x impl x local batch b x dim d x device count n, compiles
`value_and_grad(contrastive_loss)` over a global batch B = n*b sharded over the
first n devices of an emulated CPU mesh, and prints XLA's per-device temporary
memory (`compile().memory_analysis()`) and the measured wall time per call
(after a warm-up call, `block_until_ready`, median of --iters).

    python benchmarks/loss_memory.py                      # the full table (minutes)
    python benchmarks/loss_memory.py --b 512 --d 256 --no-time   # memory only, fast

On the emulated mesh all n "devices" share the host's cores, so time measures
the total work of n devices (B^2 grows), not a real pod's step time.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from clipjax.losses import contrastive_loss  # noqa: E402

MiB = 2**20


def _ints(text):
    return [int(v) for v in text.split(",") if v]


def _words(text):
    return [v for v in text.split(",") if v]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--b", type=_ints, default=[256, 512, 1024], help="local batches, e.g. 256,512")
    p.add_argument("--d", type=_ints, default=[256, 512], help="embedding dims")
    p.add_argument("--devices", type=_ints, default=[1, 2, 4, 8], help="device counts")
    p.add_argument("--kinds", type=_words, default=["softmax", "sigmoid"])
    p.add_argument("--impls", type=_words, default=["dense", "ring"])
    p.add_argument("--chunk", type=int, default=0, help="loss.chunk for the ring")
    p.add_argument("--iters", type=int, default=3, help="timed calls per row (median)")
    p.add_argument("--no-time", action="store_true", help="memory only: compile, do not run")
    return p.parse_args(argv)


def measure(kind, impl, b, d, n, *, chunk=0, iters=3, timed=True):
    """(temp bytes per device, seconds per loss+grad call or None) for one configuration."""
    devices = jax.devices()[:n]
    mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=devices)
    rows = NamedSharding(mesh, P("data", None))
    rep = NamedSharding(mesh, P())
    rng = np.random.default_rng(0)

    def unit(shape):
        v = rng.standard_normal(shape).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    x = jax.device_put(unit((n * b, d)), rows)
    y = jax.device_put(unit((n * b, d)), rows)
    scale = jax.device_put(jnp.float32(np.log(10.0)), rep)
    bias = jax.device_put(jnp.float32(-10.0), rep)

    def loss(x, y, scale, bias):
        return contrastive_loss(x, y, scale, bias if kind == "sigmoid" else None, kind=kind,
                                impl=impl, mesh=mesh, chunk=chunk if impl == "ring" else 0)[0]

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    compiled = step.lower(x, y, scale, bias).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    if not timed:
        return temp, None
    jax.block_until_ready(compiled(x, y, scale, bias))  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(compiled(x, y, scale, bias))
        times.append(time.perf_counter() - start)
    return temp, statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    if max(args.devices) > len(jax.devices()):
        print(f"only {len(jax.devices())} devices", file=sys.stderr)
        return 2
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, chunk={args.chunk}; "
          "temp = per-device temporary memory from XLA's memory_analysis()")
    header = f"{'kind':8} {'impl':5} {'b':>5} {'d':>4} {'dev':>3} {'B':>6} " \
             f"{'temp MiB':>9} {'vs B=2b':>8} {'ms/step':>9}"
    print(header)
    print("-" * len(header))
    for kind in args.kinds:
        for impl in args.impls:
            for b in args.b:
                for d in args.d:
                    at_2b = None
                    for n in args.devices:
                        temp, secs = measure(kind, impl, b, d, n, chunk=args.chunk,
                                             iters=args.iters, timed=not args.no_time)
                        if n == 2:
                            at_2b = temp
                        ratio = f"{temp / at_2b:8.2f}" if at_2b else f"{'':8}"
                        ms = f"{secs * 1e3:9.1f}" if secs is not None else f"{'-':>9}"
                        print(f"{kind:8} {impl:5} {b:5d} {d:4d} {n:3d} {n * b:6d} "
                              f"{temp / MiB:9.2f} {ratio} {ms}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
