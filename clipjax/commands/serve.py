"""`clipjax serve`: a search page and a JSON API over a `clipjax embed` cache."""

from __future__ import annotations

import argparse
import os

from clipjax.commands import flags

HELP = "serve a search web page and an HTTP API over an embedding cache"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, metavar="INDEX_DIR",
                   help="a cache written by `clipjax embed` (local or gs://)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other than loopback "
                        "needs --token)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free)")
    p.add_argument("--token", default=os.environ.get("CLIPJAX_SERVE_TOKEN"),
                   help="bearer token every request must carry (default: $CLIPJAX_SERVE_TOKEN; "
                        "the environment keeps it out of `ps`)")
    flags.add_workdir(p, required=False, dest="model",
                      help="the model to embed queries with (default: the one recorded in the "
                           "cache; it must be the model that embedded the images)")
    flags.add_step(p, help="checkpoint step of --workdir")
    p.add_argument("--approximate", action="store_true",
                   help="search the approximate index (see `clipjax search --approximate`)")
    p.add_argument("--index-kind", choices=("ivf", "hnsw"), default="ivf",
                   help="approximate index kind (default ivf)")
    p.add_argument("--nprobe", type=int, default=32, help="ivf: cells scanned per query")
    p.add_argument("--ef-search", type=int, default=64, help="hnsw: search breadth")
    p.add_argument("--max-batch", type=int, default=32, metavar="N",
                   help="most concurrent text queries embedded together (default 32)")
    p.add_argument("--search-threads", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                   metavar="N", help="faiss threads per search (default: half the CPUs, "
                                     "at most 8)")
    p.add_argument("--max-upload-mb", type=float, default=16.0, metavar="MB",
                   help="largest request body, e.g. an uploaded image in base64 (default 16)")
    p.add_argument("--max-pixels", type=int, default=89_478_485,
                   help="images declaring more pixels are refused as decompression bombs "
                        "(default 89478485, as data.max_image_pixels)")
    p.add_argument("--thumbnail-size", type=int, default=256, metavar="PX",
                   help="longest side of the thumbnails (default 256)")
    p.add_argument("--thumbnails", metavar="DIR", default=None,
                   help="where thumbnails are cached on disk (default INDEX_DIR/thumbnails "
                        "for a local cache; none for a remote one)")
    p.add_argument("--access-log", action="store_true", help="log every request")


def check_args(args) -> None:
    """The checks that need no model: run before anything is loaded."""
    from clipjax.errors import ClipjaxError
    from clipjax.serve.app import is_loopback

    if not is_loopback(args.host) and not args.token:
        raise ClipjaxError(
            f"--host {args.host} is not a loopback address: anyone who can reach it could "
            "search and read your photos; give --token (or $CLIPJAX_SERVE_TOKEN) as well")
    if args.token is not None and len(args.token) < 8:
        raise ClipjaxError("--token must be at least 8 characters")
    if not 0 <= args.port <= 65535:
        raise ClipjaxError(f"--port must be from 0 to 65535, got {args.port}")
    if args.search_threads < 1:
        raise ClipjaxError(f"--search-threads must be >= 1, got {args.search_threads}")
    if args.max_batch < 1:
        raise ClipjaxError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.max_upload_mb <= 0 or args.thumbnail_size < 16 or args.max_pixels < 1:
        raise ClipjaxError("--max-upload-mb, --max-pixels and --thumbnail-size (>= 16) "
                           "must be positive")


def listen(host: str, port: int):
    """A listening socket (bound before the model loads, so a busy port fails at once)."""
    import socket

    from clipjax.errors import ClipjaxError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise ClipjaxError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def run(args) -> int:
    from clipjax import paths
    from clipjax.apps import console, search

    check_args(args)
    sock = listen(args.host, args.port)
    kind = args.index_kind if args.approximate else "exact"
    index = search.ImageIndex.open(args.index, kind, nprobe=args.nprobe,
                                   ef_search=args.ef_search)
    model_path, step = search.recorded_model(index, args.model, args.step)
    model = console.load_model(model_path, step, args.max_batch)
    search.check_model(model, index)

    import uvicorn

    from clipjax.serve.app import create_app
    from clipjax.serve.service import SearchService
    from clipjax.serve.thumbnails import Thumbnails

    service = SearchService(model, index, max_batch=args.max_batch, max_pixels=args.max_pixels)
    service.tune_search(args.search_threads)
    service.warm_up()
    thumb_dir = args.thumbnails
    if thumb_dir is None and paths.local(index.cache.directory) is not None:
        thumb_dir = os.path.join(os.fspath(paths.local(index.cache.directory)), "thumbnails")
    thumbnails = Thumbnails(index.paths, size=args.thumbnail_size, directory=thumb_dir,
                            max_pixels=args.max_pixels)
    app = create_app(service, thumbnails, token=args.token,
                     loopback_only=_is_loopback(args.host),
                     max_body_bytes=int(args.max_upload_mb * (1 << 20)))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"clipjax serve: {len(index)} images ({index.cache.dim} dimensions) on "
          f"http://{shown}:{port}/" + ("  (token required)" if args.token else ""), flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=args.access_log,
                            lifespan="on", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _is_loopback(host: str) -> bool:
    from clipjax.serve.app import is_loopback

    return is_loopback(host)
