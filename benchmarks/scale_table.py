"""Does CLIP at a 32k / 256k / 1M global batch fit a TPU pod? `clipjax compile`, tabulated.

    .venv/bin/python benchmarks/scale_table.py [--models vit_b16,vit_l14]
        [--batches 32768,262144,1048576] [--topologies v5e-256,v5p-128] [--impls dense,ring]
        [--kernels auto|cpu|xla] [--remat dots_no_batch|full|...] [--num-slices N]

Each cell compiles the real train step (`clipjax.aot`, the code behind
`clipjax compile`) for the slice on this CPU with libtpu and prints per-chip
memory against HBM. A cell that does not fit is compiled again with GradCache
accumulation (`train.grad_accum`) so each micro-batch is `--micro-batch` (32k by
default, OpenAI's batch): the answer a user needs is "fits, with accum N".
Compiling a ViT-L step takes a minute or more per cell on a 2-core machine:
pick a subset with the flags. `--kernels` (default auto: the XLA kernels on TPU)
and `--remat` change the recipe for every cell; `configs/clip_vit_l14.py` is the
ViT-L/14 recipe that fits a v5e-256 at every batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODELS = {"vit_b16": "ViT-B-16-quickgelu", "vit_l14": "ViT-L-14-quickgelu"}
GIB = float(1 << 30)


def _config(model: str, batch: int, impl: str, accum: int = 1, kernels: str = "auto",
            remat: str = ""):
    """OpenAI's recipe (configs/clip_vit_b16.py) around the model: bf16, scanned, remat,
    params and optimizer state sharded 4-way (fsdp), the batch over every chip."""
    from clipjax import config as config_lib
    from clipjax.train.recipes import openai_clip

    c = openai_clip(MODELS[model], batch)
    c.mesh.data, c.mesh.fsdp = -1, 4
    c.loss.impl = impl
    c.train.grad_accum = accum
    c.model.kernels = kernels
    if remat:
        c.model.remat = remat
    return config_lib.validate(c)


def _cell(model: str, topo: str, batch: int, impl: str, accum: int, kernels: str = "auto",
          remat: str = "", num_slices: int = 1) -> bool:
    """Compiles and prints one cell; True when it did not fit (worth a retry)."""
    from clipjax import aot

    start = time.perf_counter()
    head = f"{model:8} {topo:9} {batch:8d} {impl:5} {accum:5d}"
    try:
        r = aot.compile_for_topology(_config(model, batch, impl, accum, kernels, remat), topo,
                                     num_slices)
    except Exception as e:  # one cell's failure is a result, not the end
        print(f"{head} error: {str(e).splitlines()[0][:80]}", flush=True)
        return False
    verdict = ("fits" if r.fits else "does not fit") + ("*" if r.compiler_oom else "")
    print(f"{head} {r.argument_bytes / GIB:9.2f} {r.temp_bytes / GIB:9.2f} "
          f"{r.per_chip_bytes / GIB:9.2f} {r.hbm_bytes_per_chip / GIB:8.0f}  "
          f"{verdict:14} {time.perf_counter() - start:6.0f}", flush=True)
    return not r.fits


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit_b16,vit_l14")
    p.add_argument("--batches", default="32768,262144,1048576")
    p.add_argument("--topologies", default="v5e-256,v5p-128")
    p.add_argument("--impls", default="dense,ring")
    p.add_argument("--kernels", default="auto", choices=("auto", "cpu", "xla"),
                   help="model.kernels (auto: the XLA kernels, as the TPU target resolves it)")
    p.add_argument("--remat", default="", help="model.remat for every cell (default: the "
                                               "recipe's dots_no_batch)")
    p.add_argument("--num-slices", type=int, default=1, help="multi-slice (DCN) count")
    p.add_argument("--micro-batch", type=int, default=32768,
                   help="retry a cell that does not fit with accumulation down to this micro-batch"
                        " (0: no retry)")
    args = p.parse_args()
    print(f"{'model':8} {'topology':9} {'batch':>8} {'impl':5} {'accum':>5} {'args GiB':>9} "
          f"{'temp GiB':>9} {'total GiB':>9} {'HBM GiB':>8}  verdict        compile s")
    for model in args.models.split(","):
        for topo in args.topologies.split(","):
            for batch in map(int, args.batches.split(",")):
                for impl in args.impls.split(","):
                    accums = [1]
                    if args.micro_batch and batch > args.micro_batch:
                        accums.append(batch // args.micro_batch)
                    for accum in accums:
                        if not _cell(model, topo, batch, impl, accum, args.kernels,
                                     args.remat, args.num_slices):
                            break
    print("* XLA's TPU compiler refused the program for lack of HBM; temp = what it asked for")
    return 0


if __name__ == "__main__":
    sys.exit(main())
