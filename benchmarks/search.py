"""Vector search: index build time, query latency and recall@10 of the approximate
indexes, on random unit vectors (d=512) — the index `clipjax search` uses.

    python benchmarks/search.py            # 10k and 1M vectors (~2 GB each copy at 1M)
    python benchmarks/search.py --quick    # 10k and 100k
    python benchmarks/search.py --sizes 10000,200000 --data clustered --hnsw

Latency is the median wall time of one single-query search (what an interactive
`clipjax search` does); throughput is a batch of queries in one call. Recall@10
is the overlap of an approximate index's top 10 with the exact top 10.

`--data uniform` (the default) draws vectors uniformly on the sphere: the
hardest case for approximate search (no cluster structure; every point is
almost equally far). `--data clustered` draws them around N/100 centres
(noise `--spread` per coordinate; queries are data points plus the same
noise), closer to real CLIP embeddings.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from clipjax.apps import vector_index  # noqa: E402


def unit_rows(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_data(n: int, d: int, kind: str, rng, spread: float) -> np.ndarray:
    """n unit vectors, float32, filled in chunks to cap temporary memory."""
    out = np.empty((n, d), np.float32)
    centres = unit_rows(rng.standard_normal((max(100, n // 100), d)).astype(np.float32))
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        x = rng.standard_normal((e - s, d)).astype(np.float32)
        if kind == "clustered":
            x = centres[rng.integers(0, len(centres), e - s)] + spread * x
        out[s:e] = unit_rows(x)
    return out


def make_queries(data: np.ndarray, q: int, kind: str, rng, spread: float) -> np.ndarray:
    if kind == "uniform":
        return unit_rows(rng.standard_normal((q, data.shape[1])).astype(np.float32))
    picks = data[rng.integers(0, len(data), q)]
    return unit_rows(picks + spread * rng.standard_normal(picks.shape).astype(np.float32))


def latency_ms(index, queries: np.ndarray, k: int, repeats: int) -> float:
    times = []
    for i in range(repeats):
        q = queries[i % len(queries)][None]
        t = time.perf_counter()
        vector_index.search(index, q, k)
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def recall_at(ids: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, truth)]))


def bench(n: int, args, rng) -> list[dict]:
    data = make_data(n, args.dim, args.data, rng, args.spread)
    queries = make_queries(data, args.queries, args.data, rng, args.spread)
    rows = []
    configs = [("exact", vector_index.IndexOptions("exact"))]
    for nprobe in args.nprobe:
        configs.append((f"ivf nprobe={nprobe}", vector_index.IndexOptions("ivf", nprobe=nprobe)))
    if args.hnsw and (n <= args.hnsw_max):
        configs.append(("hnsw", vector_index.IndexOptions("hnsw")))
    truth = None
    ivf = None  # (index, build seconds): one IVF index serves every nprobe
    for name, options in configs:
        if options.kind == "ivf" and ivf is not None:
            index, build_s = ivf
            vector_index.configure(index, options)
        else:
            t = time.perf_counter()
            index = vector_index.build(data, options)
            build_s = time.perf_counter() - t
            if options.kind == "ivf":
                ivf = (index, build_s)
        t = time.perf_counter()
        _, ids = vector_index.search(index, queries, args.k)
        batch_s = time.perf_counter() - t
        if truth is None:
            truth = ids
        rows.append({
            "n": n, "index": name, "build_s": build_s,
            "latency_ms": latency_ms(index, queries, args.k, args.repeats),
            "qps": len(queries) / batch_s,
            "recall": recall_at(ids, truth),
            "nlist": getattr(vector_index._as_ivf(index), "nlist", ""),
        })
        print(_row(rows[-1]), flush=True)
        if options.kind == "exact":
            del index
    return rows


def _row(r: dict) -> str:
    return (f"| {r['n']:>9,} | {r['index']:<16} | {r['nlist']!s:>5} | {r['build_s']:>8.2f} | "
            f"{r['latency_ms']:>8.2f} | {r['qps']:>9,.0f} | {r['recall']:>6.3f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10k and 100k vectors")
    p.add_argument("--sizes", default="", help="comma-separated vector counts")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--data", choices=("uniform", "clustered"), default="uniform")
    p.add_argument("--spread", type=float, default=0.05,
                   help="clustered: per-coordinate noise around the centres (and of the "
                        "queries around data points)")
    p.add_argument("--queries", type=int, default=1000, help="queries for recall and qps")
    p.add_argument("--repeats", type=int, default=50, help="single queries timed for latency")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobe", default="8,32,128", help="ivf nprobe values to compare")
    p.add_argument("--hnsw", action="store_true", help="also build HNSW (slow to build)")
    p.add_argument("--hnsw-max", type=int, default=200_000,
                   help="largest size to build HNSW at (default 200k)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.nprobe = [int(x) for x in args.nprobe.split(",") if x]
    sizes = ([int(x) for x in args.sizes.split(",")] if args.sizes
             else [10_000, 100_000] if args.quick else [10_000, 1_000_000])
    import faiss

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, "
          f"{os.cpu_count()} cpus; d={args.dim}, data={args.data}, k={args.k}, "
          f"{args.queries} queries")
    print("|   vectors | index            | nlist |  build s | query ms | batch q/s | recall |")
    print("|----------:|------------------|------:|---------:|---------:|----------:|-------:|")
    rng = np.random.default_rng(args.seed)
    for n in sizes:
        bench(n, args, rng)
    return 0


if __name__ == "__main__":
    sys.exit(main())
