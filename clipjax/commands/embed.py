"""`clipjax embed`: embed a folder of images into an incremental embedding cache that
`clipjax search` queries."""

from __future__ import annotations

import argparse

from clipjax.commands import flags

HELP = "embed images into an incremental embedding cache (for clipjax search)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from clipjax.apps import console

    console.add_model_arguments(p, required=False)
    p.add_argument("--images", required=True, nargs="+", metavar="PATH_OR_GLOB",
                   help="image files, folders (searched recursively) or quoted glob patterns")
    p.add_argument("--out", required=True, metavar="INDEX_DIR",
                   help="the cache directory (local or gs://); re-running embeds only new or "
                        "changed files")
    p.add_argument("--dtype", choices=("float16", "float32"), default=None,
                   help="storage type of the embeddings (default float16; an existing "
                        "cache keeps its own)")
    p.add_argument("--prune", action="store_true",
                   help="also drop cached files that --images no longer names")
    p.add_argument("--rebuild", action="store_true",
                   help="re-embed everything (to switch model or dtype)")
    p.add_argument("--approximate", nargs="?", const="ivf", default=None,
                   choices=("ivf", "hnsw"),
                   help="also build the approximate index now (default kind: ivf)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    flags.add_progress(p)
    p.epilog = ("--workdir may be left out when INDEX_DIR exists: the model that made the "
                "cache is used again.")


def run(args) -> int:
    from clipjax.apps import console
    from clipjax.apps.embedding_cache import EmbeddingCache
    from clipjax.apps.image_files import require_local
    from clipjax.errors import ClipjaxError

    for spec in args.images:  # before the model loads: images must be local files
        require_local(spec)
    cache = EmbeddingCache.open_or_empty(args.out, dtype=args.dtype or "float16")
    model_path, step, which = args.model, args.step, args.params
    if model_path is None:
        model_path = cache.model.get("workdir")
        step = cache.model.get("step") if step is None else step
        which = cache.model.get("params") if which is None else which
        if not model_path:
            raise ClipjaxError(f"give --workdir: {args.out} holds no cache made from a workdir")
    model = console.load_model(model_path, step, args.batch_size, which)
    report = cache.update(model, args.images, batch_size=args.batch_size, dtype=args.dtype,
                          prune=args.prune, rebuild=args.rebuild,
                          progress=flags.progress(args))
    console.report_skipped(report.skipped)
    if args.approximate:
        from clipjax.apps.search import ImageIndex

        ImageIndex.from_cache(cache, args.approximate, save=True)
    if args.json:
        console.print_json({
            "index": cache.directory, "count": len(cache), "embedded": report.embedded,
            "new": len(report.new), "changed": len(report.changed),
            "unchanged": report.unchanged, "removed": len(report.removed),
            "skipped": [{"path": p, "reason": r} for p, r in report.skipped]})
    else:
        print(f"{cache.directory}: {len(cache)} images; {report.summary()}")
    return 0
