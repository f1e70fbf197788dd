"""Evaluation images inside training shards: exact hashes first, then near-duplicates.

A zero-shot number on a set whose images the model trained on measures memory.
Every evaluation image is described at several centre crops (`crops`: a copy
that was cropped matches the crop of the original at the same scale), every
training image once; a training image whose best cosine against any evaluation
description reaches `threshold` is listed (faiss, exact inner product). Before
that, images with identical decoded pixels are listed as exact copies whatever
the threshold.

Descriptions (`features`):
- `clip`: the model's image embedding (`--model`); what a large CLIP offers,
  robust to re-encoding, resizing, crops and small edits;
- `pixels`: a model-free 16x16 grey thumbnail, centred and L2-normalised (the
  cosine is the normalised cross-correlation): catches resized, re-encoded and
  cropped copies without a model, and does not collapse look-alikes of one class
  the way a small model's semantic embedding does.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from clipjax import paths
from clipjax.apps import vector_index
from clipjax.curation import samples as samples_lib
from clipjax.data import decode
from clipjax.data.preprocess import as_pil, center_crop, to_rgb
from clipjax.errors import ClipjaxError

FEATURES = ("clip", "pixels")
THUMB = 16
DEFAULT_CROPS = (1.0, 0.9, 0.8)
HEADER = "shard\tkey\tsimilarity\tmatch\tmethod"
CHUNK = 256


def pixel_hash(img: Image.Image) -> bytes:
    """Identity of the decoded RGB pixels (survives lossless re-encoding, renames)."""
    img = to_rgb(img)
    h = hashlib.sha1(f"{img.size}".encode())
    h.update(img.tobytes())
    return h.digest()


def crop_center(img: Image.Image, fraction: float) -> Image.Image:
    if fraction >= 1.0:
        return img
    w, h = img.size
    cw, ch = max(1, round(w * fraction)), max(1, round(h * fraction))
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


def thumbnail(img: Image.Image) -> np.ndarray:
    """float32 [THUMB*THUMB]: square centre, grey, 16x16, zero mean, unit norm."""
    g = center_crop(to_rgb(img), min(img.size)).convert("L")
    v = np.asarray(g.resize((THUMB, THUMB), Image.BILINEAR), np.float32).reshape(-1)
    v = v - v.mean()
    return v / max(float(np.linalg.norm(v)), 1e-6)


class Describer:
    """Images -> float32 [N, d] rows, L2-normalised, with the chosen features."""

    def __init__(self, features: str, model=None, workers: int = 4):
        if features not in FEATURES:
            raise ClipjaxError(f"--features {features!r}: choose from {', '.join(FEATURES)}")
        if features == "clip" and model is None:
            raise ClipjaxError("--features clip needs --model WORKDIR (or use --features pixels)")
        self.features, self.model = features, model
        self.pool = ThreadPoolExecutor(workers)

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            d = self.model.embed_dim if self.features == "clip" else THUMB * THUMB
            return np.zeros((0, d), np.float32)
        if self.features == "pixels":
            return np.stack(list(self.pool.map(thumbnail, images)))
        pixels = np.stack(list(self.pool.map(self.model.preprocess.pixels, images)))
        return self.model.encode_images(pixels)


def eval_images(against: str, split: str = "", data_dir: str = ""
                ) -> Iterator[tuple[str, Image.Image]]:
    """(name, image) of the evaluation set: a folder of images, or any `clipjax eval` task."""
    from clipjax.apps import image_files
    from clipjax.evaluate import datasets
    from clipjax.evaluate import tasks as tasks_lib

    if not paths.is_remote(against) and ":" not in against and paths.is_dir(against):
        for p in image_files.find_images(against):
            yield p, image_files.open_image(p)
        return
    task = tasks_lib.parse(against)
    source = tasks_lib.load_source(task, split or tasks_lib.test_split(task), data_dir)
    for i, (image, _) in enumerate(source):
        yield f"{task.label}#{i}", to_rgb(as_pil(datasets.decode(image)))


def _training_images(urls: Sequence[str], skipped: dict) -> Iterator[tuple[str, str, Image.Image]]:
    for url in urls:
        for rec in samples_lib.iter_records(url):
            try:
                if rec.get("error"):
                    raise decode.BadSample(rec["error"])
                img = decode.decode_image(rec["image"], samples_lib.DEFAULT_MAX_PIXELS)
            except decode.BadSample as e:
                samples_lib.count(skipped, e.reason)
                continue
            yield url, samples_lib.sample_key(rec["key"]), img


def _chunked(it, n):
    chunk = []
    for x in it:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def find_duplicates(urls: Sequence[str], eval_items, describe: Describer, threshold: float,
                    crops: Sequence[float] = DEFAULT_CROPS) -> tuple[list[tuple], dict]:
    """Rows (shard, key, similarity, match name, method) and a report."""
    if not -1.0 <= threshold <= 1.0:
        raise ClipjaxError(f"--threshold is a cosine in [-1, 1]; got {threshold}")
    if not crops or any(not 0.0 < c <= 1.0 for c in crops):
        raise ClipjaxError(f"--crops must be fractions in (0, 1]; got {list(crops)}")
    start = time.perf_counter()
    names, hashes, rows = [], {}, []
    for chunk in _chunked(eval_items, CHUNK):
        imgs = []
        for name, img in chunk:
            hashes.setdefault(pixel_hash(img), len(names))
            names.append(name)
            imgs.extend(crop_center(img, c) for c in crops)
        rows.append(describe(imgs))
    if not names:
        raise ClipjaxError("the evaluation set holds no images")
    index = vector_index.build(np.concatenate(rows))
    found, skipped = [], {}
    seen = exact = 0
    for chunk in _chunked(_training_images(urls, skipped), CHUNK):
        seen += len(chunk)
        sims, ids = vector_index.search(index, describe([c[2] for c in chunk]), 1)
        for (url, key, img), sim, i in zip(chunk, sims[:, 0], ids[:, 0]):
            hit = hashes.get(pixel_hash(img))
            if hit is not None:
                found.append((url, key, 1.0, names[hit], "exact"))
                exact += 1
            elif sim >= threshold:
                found.append((url, key, float(sim), names[int(i) // len(crops)], "near"))
    report = {"training_samples": seen, "eval_images": len(names), "duplicates": len(found),
              "exact": exact, "near": len(found) - exact, "skipped": skipped,
              "threshold": threshold, "features": describe.features, "crops": list(crops),
              "seconds": round(time.perf_counter() - start, 3)}
    return found, report


def write_list(path: str, rows: Sequence[tuple]) -> None:
    """TSV with a header: shard, key, similarity, match, method (what `filter --exclude` reads)."""
    lines = [HEADER] + [f"{s}\t{k}\t{sim:.4f}\t{m}\t{how}" for s, k, sim, m, how in rows]
    paths.write_text(path, "\n".join(lines) + "\n")
