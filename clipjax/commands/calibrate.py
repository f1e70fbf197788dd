"""`clipjax calibrate`: choose `clipjax classify --threshold` on a labelled folder."""

from __future__ import annotations

import argparse

from clipjax.commands import flags

HELP = "choose the open-set threshold of clipjax classify for a target precision"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from clipjax.apps import console
    from clipjax.commands.classify import add_label_arguments

    console.add_model_arguments(p)
    add_label_arguments(p)
    p.add_argument("--folder", required=True, metavar="LABELLED_DIR",
                   help="one sub-folder per label (named like it) plus sub-folders of "
                        "images of no label (e.g. none/)")
    p.add_argument("--precision", type=float, default=0.95,
                   help="target precision of the flags (default 0.95)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    flags.add_progress(p)


def run(args) -> int:
    from clipjax.apps import calibrate, classify, console
    from clipjax.apps.image_files import embed_files

    labels = classify.parse_labels(args.labels, args.labels_file)
    templates = classify.resolve_templates(args.templates)
    paths, truth, negative_dirs = calibrate.labelled_images(args.folder, labels)
    model = console.load_model(args.model, args.step, args.batch_size, args.params)
    classifier = classify.build_classifier(model, labels, templates)
    ok, emb, bad = embed_files(model, paths, batch_size=args.batch_size,
                               progress=flags.progress(args))
    console.report_skipped(bad)
    truth_of = dict(zip(paths, truth))
    result = calibrate.calibrate(classifier, emb, [truth_of[p] for p in ok], args.precision)
    if args.json:
        console.print_json({**result.to_json(), "negative_folders": negative_dirs,
                            "skipped": len(bad)})
        return 0
    print(f"threshold {result.threshold:.4f}: precision {result.precision:.3f} "
          f"(target {result.target_precision:g}), recall {result.recall:.3f}; "
          f"{result.correct} correct of {result.flagged} flagged; {result.positives} labelled "
          f"and {result.negatives} negative images"
          + (f" (from {', '.join(negative_dirs)})" if negative_dirs else ""))
    print(f"use: clipjax classify --threshold {result.threshold:.4f} --none-label none ...")
    return 0
