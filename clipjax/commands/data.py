"""`clipjax data check|convert`: validate training shards, or write them from your data."""

from __future__ import annotations

import argparse
import json

HELP = "check webdataset shards or folders; convert folder/tfds/idx data to webdataset shards"
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


def run(args) -> int:
    from clipjax.errors import ClipjaxError

    if args.action == "check":
        return _check(args)
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
