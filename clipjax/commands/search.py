"""`clipjax search`: text→image or image→image search over a `clipjax embed` cache."""

from __future__ import annotations

import argparse

from clipjax.commands import flags

HELP = "search an embedding cache by text or by image"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, metavar="INDEX_DIR",
                   help="a cache written by `clipjax embed` (local or gs://)")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--query", metavar="TEXT", help="find images matching this text")
    query.add_argument("--image", metavar="FILE", help="find images similar to this image")
    p.add_argument("--k", type=int, default=10, help="number of hits (default 10)")
    p.add_argument("--json", action="store_true",
                   help='print a JSON list of {"path", "score"} (cosine similarity)')
    p.add_argument("--contact-sheet", metavar="OUT.png",
                   help="also write a PNG grid of the hits with their scores")
    p.add_argument("--approximate", action="store_true",
                   help="use the approximate index (built once per cache revision and "
                        "saved in INDEX_DIR) instead of exact search")
    p.add_argument("--index-kind", choices=("ivf", "hnsw"), default="ivf",
                   help="approximate index kind (default ivf)")
    p.add_argument("--nlist", type=int, default=0,
                   help="ivf: k-means cells when the index is built (default ~sqrt(N))")
    p.add_argument("--nprobe", type=int, default=32,
                   help="ivf: cells scanned per query (recall vs speed; default 32)")
    p.add_argument("--ef-search", type=int, default=64,
                   help="hnsw: search breadth (recall vs speed; default 64)")
    flags.add_workdir(p, required=False, dest="model",
                      help="the model to embed the query with (default: the one recorded in "
                           "the cache; it must be the model that embedded the images)")
    flags.add_step(p, help="checkpoint step of --workdir")


def run(args) -> int:
    from clipjax.apps import console, search
    from clipjax.errors import ClipjaxError

    if args.k < 1:
        raise ClipjaxError(f"--k must be >= 1, got {args.k}")
    kind = args.index_kind if args.approximate else "exact"
    index = search.ImageIndex.open(args.index, kind, nlist=args.nlist, nprobe=args.nprobe,
                                   ef_search=args.ef_search)
    model_path, step = search.recorded_model(index, args.model, args.step)
    if args.image is None and not args.query.strip():
        raise ClipjaxError("--query is empty")
    model = console.load_model(model_path, step, params=index.cache.model.get("params"))
    search.check_model(model, index)
    if args.image is not None:
        from clipjax.apps.image_files import UnreadableImage, open_image

        try:
            vector = model.encode_images([open_image(args.image)])
        except UnreadableImage as e:
            raise ClipjaxError(f"cannot read the query image {e}") from None
    else:
        vector = model.encode_texts([args.query])
    hits = index.search_vectors(vector, args.k)[0]
    if args.contact_sheet:
        from clipjax.apps.contact_sheet import contact_sheet

        title = f"query: {args.query}" if args.image is None else f"image: {args.image}"
        contact_sheet(hits, args.contact_sheet, title=title)
    if args.json:
        console.print_json([h.to_json() for h in hits])
    else:
        for rank, h in enumerate(hits, 1):
            print(f"{rank:>3}  {h.score:.4f}  {h.path}")
        if args.contact_sheet:
            print(f"contact sheet: {args.contact_sheet}")
    return 0
