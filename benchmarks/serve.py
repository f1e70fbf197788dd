"""`clipjax serve` under load: text queries over loopback HTTP at 1, 4 and 16 clients.

    python benchmarks/serve.py                      # 100k vectors, ViT-B-32, 2,000 queries
    python benchmarks/serve.py --queries 500 --model ViT-B-16 --vectors 1000000

The index body is `--vectors` random unit vectors (d = the model's embed_dim) in a
real `clipjax embed` cache; the queries are real texts embedded by the real
model architecture (`--model`, a preset; random weights: no hub is reachable
here, and the cost of a forward pass does not depend on the weights). The server
runs in its own process (the app of `clipjax serve`: Starlette + uvicorn,
micro-batching on); each client is a thread with one keep-alive connection that
sends its next query when the last one is answered. Reported: queries/s over
the whole level, p50 / p99 latency per query (client side, HTTP included), and the
mean number of texts the server embedded per model call.
clip-retrieval's `clip back` publishes ~20 queries/s and ~50 ms per query.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

NOUNS = ("dog", "cat", "beach", "mountain", "city street", "bicycle", "birthday cake",
         "red car", "sunset", "forest", "child", "old man", "kitchen", "snow", "boat",
         "flower", "bridge", "horse", "pizza", "guitar", "train", "airplane", "book", "bird")
FORMS = ("a photo of a {}", "a {} at night", "my {} last summer", "a blurry picture of a {}",
         "{}", "two people next to a {}", "a close-up of a {} in the rain")


def texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [FORMS[rng.integers(len(FORMS))].format(NOUNS[rng.integers(len(NOUNS))])
            + f" #{i}" for i in range(n)]


def write_index(directory: str, n: int, dim: int, seed: int = 0) -> None:
    """An embedding cache of n random unit vectors (what `clipjax embed` would write)."""
    from clipjax.apps.embedding_cache import EmbeddingCache

    rng = np.random.default_rng(seed)
    rows = np.empty((n, dim), np.float16)
    for s in range(0, n, 50_000):
        x = rng.standard_normal((min(n, s + 50_000) - s, dim)).astype(np.float32)
        rows[s:s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    paths = [f"/photos/{i // 1000:03d}/img_{i:06d}.jpg" for i in range(n)]
    meta = {"format": 1, "model": {"workdir": None, "step": None, "fingerprint": None},
            "dim": dim, "dtype": "float16", "count": n, "revision": "bench", "skipped": []}
    EmbeddingCache(directory, paths, np.zeros(n, np.int64), np.zeros(n, np.int64), rows,
                   meta).save()


def model_config(name: str):
    from clipjax.config import default_config
    from clipjax.models.presets import model_config as preset

    c = default_config()
    c.model = preset(name)
    c.model.dtype = "float32"
    return c


def serve(index_dir: str, model_name: str, max_batch: int, threads: int, ready) -> None:
    """The server process: the model, the index and the app of `clipjax serve`."""
    import socket

    import jax
    import uvicorn

    from clipjax import models
    from clipjax.apps.search import ImageIndex
    from clipjax.inference import ClipModel
    from clipjax.serve.app import create_app
    from clipjax.serve.service import SearchService
    from clipjax.serve.thumbnails import Thumbnails

    config = model_config(model_name)
    model = ClipModel(config, models.init_params(config.model, jax.random.key(0)),
                      batch_size=max_batch)
    index = ImageIndex.open(index_dir)
    service = SearchService(model, index, max_batch=max_batch)
    service.tune_search(threads)
    service.warm_up()
    app = create_app(service, Thumbnails(index.paths))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    ready.put((sock.getsockname()[1], len(index), index.cache.dim))
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(
        sockets=[sock])


def post(conn, body: bytes) -> float:
    start = time.perf_counter()
    conn.request("POST", "/api/search", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {data[:200]!r}")
    return time.perf_counter() - start


def info(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("GET", "/api/info")
    return json.loads(conn.getresponse().read())


def load(port: int, queries: list[str], clients: int, k: int) -> dict:
    """`queries` split over `clients` threads; each sends the next one when answered."""
    bodies = [json.dumps({"text": q, "k": k}).encode() for q in queries]
    shares = [bodies[i::clients] for i in range(clients)]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = []

    def client(i):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            for body in shares[i]:
                latencies[i].append(post(conn, body))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            conn.close()

    before = info(port)["micro_batching"]
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    after = info(port)["micro_batching"]
    lat = np.concatenate([np.asarray(x) for x in latencies]) * 1e3
    batches = after["batches"] - before["batches"]
    return {"clients": clients, "queries": len(queries), "qps": len(queries) / wall,
            "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "batch": (after["queries"] - before["queries"]) / max(batches, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=2000, help="per concurrency level")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--model", default="ViT-B-32", help="a clipjax model preset")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--search-threads", type=int,
                    default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                    help="faiss threads (as `clipjax serve`: half the CPUs, at most 8)")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the server process inherits these
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"))
    dim = int(model_config(args.model).model.embed_dim)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_index(tmp, args.vectors, dim)
        print(f"index: {args.vectors} random unit vectors, d={dim} "
              f"({time.perf_counter() - t:.1f} s to write)", flush=True)
        ready = ctx.Queue()
        server = ctx.Process(target=serve, args=(tmp, args.model, args.max_batch,
                                                        args.search_threads, ready),
                             daemon=True)
        t = time.perf_counter()
        server.start()
        try:
            port, size, _ = ready.get(timeout=900)
            print(f"server: {args.model} (random weights), {size} vectors, exact search, "
                  f"up in {time.perf_counter() - t:.1f} s (encoders compiled)", flush=True)
            load(port, texts(20, seed=99), 1, args.k)  # connections, caches, first calls
            rows = []
            for i, clients in enumerate(levels):
                rows.append(load(port, texts(args.queries, seed=i), clients, args.k))
                r = rows[-1]
                print(f"  {clients:>2} clients: {r['qps']:.1f} q/s", flush=True)
        finally:
            server.terminate()
            server.join(10)
    load1 = os.getloadavg()[0]
    print(f"\n{args.queries} text queries per level, k={args.k}, {os.cpu_count()} CPUs "
          f"(load average {load1:.1f} at the end), max batch {args.max_batch}, "
          f"{args.search_threads} faiss thread(s)")
    print("| clients | queries/s | p50 ms | p99 ms | texts per model call |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['clients']} | {r['qps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} "
              f"| {r['batch']:.1f} |")


if __name__ == "__main__":
    main()
