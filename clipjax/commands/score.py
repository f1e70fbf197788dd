"""`clipjax score`: CLIPScore of images against texts (e.g. generated images against
their prompts)."""

from __future__ import annotations

import argparse

from clipjax.commands import flags

HELP = "CLIPScore (2.5 * max(cos, 0)) of image/text pairs, per pair and mean"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from clipjax.apps import console

    console.add_model_arguments(p)
    p.add_argument("--images", nargs="+", metavar="IMAGE",
                   help="image files, paired in order with --texts")
    p.add_argument("--texts", nargs="+", metavar="TEXT",
                   help="one text per image (or one text for all images)")
    p.add_argument("--pairs", metavar="FILE.tsv",
                   help="image<TAB>text rows instead of --images/--texts (image paths "
                        "relative to the file)")
    p.add_argument("--w", type=float, default=2.5, help="the CLIPScore weight (default 2.5)")
    p.add_argument("--prefix", default="",
                   help='text put before every text (the paper uses "A photo depicts ")')
    p.add_argument("--json", action="store_true",
                   help='print {"pairs": [{"image", "text", "score", "cosine"}], "mean"}')
    flags.add_progress(p)


def _pairs(args) -> list[tuple[str, str]]:
    from clipjax.apps.clipscore import read_pairs
    from clipjax.errors import ClipjaxError

    if args.pairs is not None:
        if args.images or args.texts:
            raise ClipjaxError("give either --pairs or --images with --texts, not both")
        return read_pairs(args.pairs)
    if not args.images or not args.texts:
        raise ClipjaxError("give --images with --texts, or --pairs FILE.tsv")
    texts = args.texts * len(args.images) if len(args.texts) == 1 else args.texts
    if len(texts) != len(args.images):
        raise ClipjaxError(f"{len(args.images)} images but {len(args.texts)} texts; give one "
                           "text per image, or one text for all")
    return list(zip(args.images, texts))


def run(args) -> int:
    import os

    import numpy as np

    from clipjax.apps import console
    from clipjax.apps.clipscore import clip_score
    from clipjax.apps.image_files import embed_files, require_local
    from clipjax.errors import ClipjaxError

    pairs = _pairs(args)
    for p, _ in pairs:
        require_local(p)
    model = console.load_model(args.model, args.step, args.batch_size, args.params)
    paths = [os.path.abspath(p) for p, _ in pairs]
    unique = sorted(set(paths))
    ok, emb, bad = embed_files(model, unique, batch_size=args.batch_size,
                               progress=flags.progress(args))
    console.report_skipped(bad)
    row = {p: i for i, p in enumerate(ok)}
    kept = [(p, t) for p, (_, t) in zip(paths, pairs) if p in row]
    if not kept:
        raise ClipjaxError("no readable image among the pairs")
    image_emb = emb[[row[p] for p, _ in kept]]
    text_emb = model.encode_texts([args.prefix + t for _, t in kept])
    scores = clip_score(image_emb, text_emb, args.w)
    cos = (image_emb * text_emb).sum(axis=1)
    mean = float(np.mean(scores))
    if args.json:
        console.print_json({
            "pairs": [{"image": p, "text": t, "score": round(float(s), 6),
                       "cosine": round(float(c), 6)}
                      for (p, t), s, c in zip(kept, scores, cos)],
            "mean": round(mean, 6), "skipped": len(pairs) - len(kept)})
    else:
        for (p, t), s in zip(kept, scores):
            print(f"{s:.4f}\t{p}\t{t}")
        print(f"mean CLIPScore {mean:.4f} over {len(kept)} pairs"
              + (f" ({len(pairs) - len(kept)} skipped)" if len(kept) < len(pairs) else ""))
    return 0
