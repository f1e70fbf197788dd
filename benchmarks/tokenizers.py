"""Tokenizer and preprocessing throughput: clipjax vs open_clip (the reference peer).

Tokenizers: strings/s over generated captions, each tokenizer freshly built
(its word cache starts empty and warms as it goes, as in a data pipeline):
plain-ASCII captions (most of LAION) and a mix where a fifth of the captions
carry accents, CJK, emoji or HTML entities. Both must give identical ids.
Preprocessing: images/s of the eval transform on a real photo (PIL in, float
array out), both single-threaded. Each number is the best of 3 runs.

    python benchmarks/tokenizers.py [--captions 20000] [--images 200]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

NOUNS = ("cat dog car house tree woman man child bird boat street beach mountain city "
         "flower table chair dress shirt shoe phone laptop guitar pizza cake horse bike "
         "bridge river lake forest garden kitchen bedroom poster logo painting").split()
ADJS = ("red blue green small large old new vintage modern beautiful dark bright wooden "
        "white black golden rustic cozy tiny huge colorful").split()
EXTRA = ("café in São Paulo", "東京の夜景", "한국 음식", "Москва зимой", "😀🎉", "&amp; more",
         "it&#39;s", "naïve façade", "“quoted”", "ＦＵＬＬ width", "Ελλάδα", "مرحبا")


def captions(n: int, mixed: bool, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(ADJS), rng.choice(NOUNS), rng.choice(("on", "with", "near", "in")),
                 "a", rng.choice(ADJS), rng.choice(NOUNS)]
        text = " ".join(words)
        if rng.random() < 0.3:
            text = text.capitalize() + f", {rng.randint(1, 2024)} - Stock Photo #{i}"
        if rng.random() < 0.2:
            text += ". " + " ".join(rng.choice(NOUNS) for _ in range(rng.randint(5, 40)))
        if mixed and rng.random() < 0.2:
            text += " " + rng.choice(EXTRA)
        out.append(text)
    return out


def rate(make_fn, items, repeats: int = 3) -> tuple[float, object]:
    """Best items/s of `repeats` runs, each with a fresh `make_fn()` (cold caches)."""
    best, result = 0.0, None
    for _ in range(repeats):
        fn = make_fn()
        start = time.perf_counter()
        result = fn(items)
        best = max(best, len(items) / (time.perf_counter() - start))
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=20000)
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()

    from clipjax import config as config_lib
    from clipjax.data import preprocess, tokenizers
    from clipjax.interop import peer

    open_clip = peer.open_clip()
    print("| corpus | strings | clipjax strings/s | open_clip strings/s | speed-up | ids equal |")
    print("|---|---|---|---|---|---|")
    for name, mixed in (("ASCII captions", False), ("mixed (20% non-ASCII)", True)):
        texts = captions(args.captions, mixed)
        r_ours, ids_ours = rate(tokenizers.ClipBpeTokenizer, texts)
        r_theirs, ids_theirs = rate(open_clip.tokenizer.SimpleTokenizer, texts)
        equal = np.array_equal(ids_ours, ids_theirs.numpy())
        print(f"| {name} | {len(texts)} | {r_ours:,.0f} | {r_theirs:,.0f} | "
              f"{r_ours / r_theirs:.1f}x | {equal} |")

    import skimage.data
    from PIL import Image

    photo = Image.fromarray(skimage.data.coffee())
    images = [photo] * args.images
    ours = preprocess.eval_transform(config_lib.default_config().model)
    _, _, theirs = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    import torch

    torch.set_num_threads(1)  # both sides single-threaded
    r_ours, _ = rate(lambda: ours.batch, images)
    r_theirs, _ = rate(lambda: lambda xs: [theirs(x) for x in xs], images)
    print()
    print("| preprocessing (400x600 photo -> 224x224) | clipjax images/s | open_clip images/s |")
    print("|---|---|---|")
    print(f"| eval transform, 1 thread | {r_ours:,.0f} | {r_theirs:,.0f} |")


if __name__ == "__main__":
    main()
