"""`clipjax classify`: zero-shot classification of images into your own labels."""

from __future__ import annotations

import argparse

from clipjax.commands import flags

HELP = "zero-shot classify images into your own labels (open-set with --threshold)"


def add_label_arguments(p: argparse.ArgumentParser) -> None:
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", metavar='"a,b,c"', help="comma-separated labels")
    labels.add_argument("--labels-file", metavar="FILE",
                        help="labels, one per line (or a JSON list)")
    p.add_argument("--templates", default="default", metavar="default|none|NAME|FILE",
                   help="prompt templates with {} for the label, ensembled per label: "
                        "'default' (OpenAI's 7 general templates), 'none' (the bare label), "
                        "a built-in set name (e.g. imagenet1k: 80 templates) or a file")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from clipjax.apps import console

    console.add_model_arguments(p)
    add_label_arguments(p)
    p.add_argument("images", nargs="+", metavar="IMAGES",
                   help="image files, folders (recursive) or quoted glob patterns")
    p.add_argument("--top-k", type=int, default=3, metavar="K",
                   help="labels to show per image (default 3)")
    p.add_argument("--threshold", type=float, default=None, metavar="T",
                   help="open set: an image whose best cosine similarity is below T gets "
                        "--none-label (choose T with `clipjax calibrate`)")
    p.add_argument("--none-label", default=None, metavar="L",
                   help="the label for images below --threshold (default 'none')")
    p.add_argument("--json", action="store_true", help="print a JSON list, one per image")
    flags.add_progress(p)


def run(args) -> int:
    from clipjax.apps import classify, console
    from clipjax.apps.image_files import embed_files, find_images
    from clipjax.errors import ClipjaxError

    if args.none_label is not None and args.threshold is None:
        raise ClipjaxError("--none-label needs --threshold")
    if args.top_k < 1:
        raise ClipjaxError(f"--top-k must be >= 1, got {args.top_k}")
    labels = classify.parse_labels(args.labels, args.labels_file)
    none_label = args.none_label or "none"
    if args.threshold is not None and none_label in labels:
        raise ClipjaxError(f"--none-label {none_label!r} is also one of the labels")
    templates = classify.resolve_templates(args.templates)
    paths = find_images(args.images)
    if not paths:
        raise ClipjaxError(f"no image files in {' '.join(args.images)}")
    model = console.load_model(args.model, args.step, args.batch_size, args.params)
    classifier = classify.build_classifier(model, labels, templates)
    ok, emb, bad = embed_files(model, paths, batch_size=args.batch_size,
                               progress=flags.progress(args))
    console.report_skipped(bad)
    preds = classify.predict(classifier, emb, top_k=args.top_k, threshold=args.threshold,
                             none_label=none_label)
    if args.json:
        console.print_json([{"path": p, **pred.to_json()} for p, pred in zip(ok, preds)])
    else:
        for path, pred in zip(ok, preds):
            top = ", ".join(f"{lab} {prob:.3f}" for lab, prob, _ in pred.top)
            print(f"{path}\t{pred.label}\t(cos {pred.score:.4f}; {top})")
    return 0
