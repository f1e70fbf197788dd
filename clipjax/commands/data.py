"""`clipjax data check|convert|score|filter|dedup`: validate training shards, write them from
your data, and curate them (CLIP scores, score filtering, evaluation-set dedup)."""

from __future__ import annotations

import argparse
import json

from clipjax.commands import flags

HELP = "check, convert (folder/tfds/idx) and curate (score, filter, dedup) webdataset shards"
TAKES_CONFIG = True  # receives --config / --config.k=v (clipjax/cli.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = sub.add_parser(
        "check", help="decode, crop and tokenize every sample; print one JSON report",
        description="Runs every sample through the training decode, crop and tokenizer and "
        "prints {\"samples\": N_ok, \"skipped\": {reason: count}, \"first_bad\": [keys]}. "
        "Exit status 0 when at least one sample is valid.")
    c.add_argument("urls", help="shards: brace pattern or '::'-separated list "
                   "(/data/{00000..00099}.tar, gs://bucket/shards/{00000..00099}.tar), or an "
                   "image folder (local or gs://)")
    c.add_argument("--tokenizer", default="clip_bpe", choices=("clip_bpe", "sentencepiece"))
    c.add_argument("--tokenizer-path", default="",
                   help="vocab (.txt.gz) or .model file, local or gs:// (default: the CLIP BPE "
                   "vocab that ships in clipjax)")
    c.add_argument("--image-size", type=int, default=224)
    c.add_argument("--context-length", type=int, default=77)
    c.add_argument("--max-image-pixels", type=int, default=None,
                   help="skip images whose header declares more pixels "
                   "(default: data.max_image_pixels)")
    c.add_argument("--workers", type=int, default=0, help="decode worker processes")

    v = sub.add_parser(
        "convert", help="write img2dataset-layout webdataset shards (+ sizes.json)",
        description="Writes NNNNN.tar shards holding KEY.jpg|png + KEY.txt + KEY.json and a "
        "sizes.json of sample counts. Class-labelled data gets captions from class names "
        "through templates (one per image, drawn with --seed).")
    v.add_argument("--from", dest="source", required=True, choices=("folder", "tfds", "idx"))
    v.add_argument("input", nargs="?", default="",
                   help="folder path | tfds dataset name | IDX directory, local or gs:// "
                   "(default /usr/share/datasets/fashion-mnist)")
    v.add_argument("--to", default="webdataset", choices=("webdataset",))
    v.add_argument("--out", required=True,
                   help="output directory, local or gs:// (each shard appears whole)")
    v.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    v.add_argument("--split", default="train", help="tfds split, or idx train|test")
    v.add_argument("--data-dir", default="", help="tfds data_dir (local or gs://)")
    v.add_argument("--image-key", default="image")
    v.add_argument("--caption-key", default="caption")
    v.add_argument("--label-key", default="label")
    v.add_argument("--template", dest="templates", action="append", default=[],
                   help="caption template with one '{}' (repeatable; default: a CLIP set)")
    v.add_argument("--classnames", default="",
                   help="comma-separated class names (idx; default from the directory)")
    v.add_argument("--seed", type=int, default=0, help="seeds the template choice")
    v.add_argument("--limit", type=int, default=0, help="stop after N samples (0 = all)")
    v.add_argument("--image-format", default="jpg", choices=("jpg", "png"),
                   help="encoding for images that are not already JPEG/PNG/WebP")


    _curation_arguments(sub)


def _curation_arguments(sub) -> None:
    s = sub.add_parser(
        "score", help="CLIP score of every image-caption pair, as Parquet tables",
        description="Writes OUT/<shard>-<hash>.parquet per shard: shard, key, caption, cosine, "
        "clipscore (2.5*max(cos,0)) [, image_embedding, text_embedding as float16]. Shards "
        "with a table are skipped (resume). Several processes split the shards (shard i goes "
        "to process i % N): pass --config.runtime.distributed=on "
        "--config.runtime.coordinator_address=H:P --config.runtime.num_processes=N "
        "--config.runtime.process_id=I, or run under launch/ (TPU pods and SLURM are detected).")
    flags.add_workdir(s, dest="model")
    flags.add_step(s)
    s.add_argument("--shards", required=True, help="brace pattern or '::'-separated list")
    s.add_argument("--out", required=True, help="directory for the score tables")
    s.add_argument("--embeddings", action="store_true",
                   help="also store the image and text embeddings (float16)")
    s.add_argument("--batch-size", type=int, default=256, help="pairs per device batch")
    s.add_argument("--workers", type=int, default=0, help="decode threads (default: cores)")
    s.add_argument("--max-image-pixels", type=int, default=0,
                   help="skip images whose header declares more pixels (default: PIL's limit)")

    f = sub.add_parser(
        "filter", help="new shards with only the pairs that pass the rules (+ a report)",
        description="Copies kept samples byte for byte into OUT/NNNNN.tar + sizes.json, and "
        "writes OUT/report.json (kept, dropped by rule, threshold) and "
        "OUT/score_histogram.png.")
    f.add_argument("--scores", required=True, help="the `data score` output directory")
    f.add_argument("--shards", required=True, help="the shards that were scored")
    f.add_argument("--out", required=True, help="output directory, local or gs://")
    g = f.add_mutually_exclusive_group(required=True)
    g.add_argument("--min-score", type=float, default=None,
                   help="keep pairs with cosine >= S (DataComp B/32: 0.25; LAION-2B: 0.28)")
    g.add_argument("--keep-fraction", type=float, default=None,
                   help="keep the top F of all scored pairs by cosine (DataComp L/14: 0.3)")
    f.add_argument("--min-caption-words", type=int, default=0,
                   help="drop captions with fewer words")
    f.add_argument("--english", action="store_true",
                   help="keep only captions py3langid identifies as English")
    f.add_argument("--exclude", default="",
                   help="a `data dedup` list (TSV: shard, key, ...): drop those samples")
    f.add_argument("--shard-size", type=int, default=10000, help="samples per output shard")

    d = sub.add_parser(
        "dedup", help="find evaluation images (near-duplicates too) in training shards",
        description="Lists training samples whose image equals (same decoded pixels) or "
        "nearly equals (cosine >= --threshold, faiss) an evaluation image, as a TSV that "
        "`data filter --exclude` reads.")
    d.add_argument("--shards", required=True, help="training shards: brace pattern or list")
    d.add_argument("--against", required=True,
                   help="evaluation images: a `clipjax eval` task (fashion_mnist, idx:DIR, "
                   "folder:DIR, wds:DIR, tfds:NAME, captions:DIR) or a folder of images")
    d.add_argument("--split", default="", help="the task's split (default: its test split)")
    d.add_argument("--data-dir", default="", help="as for `clipjax eval --data-dir`")
    d.add_argument("--threshold", type=float, required=True,
                   help="cosine at which a training image counts as a near-duplicate")
    d.add_argument("--features", default="", choices=("", "clip", "pixels"),
                   help="clip: the model's image embedding (default with --workdir); pixels: a "
                   "model-free 16x16 grey thumbnail (default without)")
    flags.add_workdir(d, required=False, dest="model",
                      help="the model whose image tower embeds (with --features clip)")
    flags.add_step(d)
    d.add_argument("--crops", default="1.0,0.9,0.8",
                   help="centre crops of each evaluation image that are indexed")
    d.add_argument("--out", required=True, help="the list (TSV) to write, local or gs://")


def run(args) -> int:
    from clipjax.errors import ClipjaxError

    if args.action == "check":
        return _check(args)
    if args.action in ("score", "filter", "dedup"):
        from clipjax.commands import curate

        return curate.run(args)
    if args.action == "convert":
        from clipjax.data import convert, idx

        inp = args.input
        if args.source == "idx" and not inp:
            inp = idx.FASHION_MNIST_DIR
        if not inp:
            raise ClipjaxError(f"--from {args.source} needs an INPUT (path or dataset name)")
        kw = dict(templates=tuple(args.templates))
        if args.source == "idx":
            kw.update(split=args.split, classnames=tuple(
                n.strip() for n in args.classnames.split(",") if n.strip()))
        elif args.source == "tfds":
            kw.update(split=args.split, data_dir=args.data_dir, image_key=args.image_key,
                      caption_key=args.caption_key, label_key=args.label_key)
        report = convert.convert_source(
            args.source, inp, args.out, args.shard_size, seed=args.seed, limit=args.limit,
            image_format=args.image_format, **kw)
        print(json.dumps(report))
        return 0
    raise ClipjaxError(f"unknown action {args.action!r}")


def _check(args) -> int:
    from clipjax import config as config_lib
    from clipjax.data import check

    base = None
    if getattr(args, "config_args", None):
        cfg_file = next((a.split("=", 1)[1] for a in args.config_args
                         if a.startswith("--config=")), None)
        overrides = [a for a in args.config_args if not a.startswith("--config=")]
        base = config_lib.load(cfg_file, overrides)
    config = check.check_config(
        args.urls, tokenizer=args.tokenizer, tokenizer_path=args.tokenizer_path,
        image_size=args.image_size, context_length=args.context_length,
        max_image_pixels=args.max_image_pixels, base=base)
    report = check.run_check(config, workers=args.workers)
    print(json.dumps(report))
    return 0 if report["samples"] > 0 else 1
