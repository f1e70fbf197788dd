"""Raw record -> training example, and the batching that counts what was skipped.

`TrainTransform` runs in the decode workers: caption checks, image header
check, decode, random resized crop, tokenization. A bad sample becomes a
`{"skip": reason, "key": key}` marker instead of an exception, so the counts
travel with the data (and with the iterator state) to the main process.
`SkipCountingBatch` groups good examples into batches of exactly `batch_size`,
normalises the pixels once per batch, and attaches the skip counts met on the way.

Random draws come from `sample_rng((seed, epoch, position))`, never from a process-
or worker-local counter: the batches do not depend on how many hosts read them.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from clipjax.data import decode
from clipjax.data.augment import RandomResizedCrop
from clipjax.data.preprocess import normalize
from clipjax.errors import ClipjaxError

MAX_BAD_KEYS = 8  # per batch; the pipeline keeps the first few overall
EXTRA_KEYS = ("label", "patches")  # per-sample fields batched along with image and text


def is_skip(example) -> bool:
    return "skip" in example


class TrainTransform:
    """(record, rng) -> {"image": uint8 [S,S,3], "text": int32 [L]} or a skip marker;
    with `labels`, also "label" (the record's class id; a record without one is skipped
    as "no_label"); with `keep` = (patches, k), also "patches": int32 [k], the sorted patch
    indices patch dropout keeps, drawn last from the sample's generator (so the crop, flip
    and caption draws are those of a run without dropout)."""

    def __init__(self, model_cfg, augment_cfg, *, max_pixels: int, tokenizer=None,
                 labels: bool = False, keep: tuple[int, int] | None = None):
        img = model_cfg.image
        self.crop = RandomResizedCrop(
            img.image_size, augment_cfg.crop_scale, augment_cfg.crop_ratio,
            flip=bool(augment_cfg.flip), interpolation=img.get("interpolation", "bicubic"))
        self.max_pixels = int(max_pixels)
        self.model_cfg = model_cfg
        self._tokenizer = tokenizer
        self.labels = labels
        self.keep = keep

    @property
    def tokenizer(self):
        if self._tokenizer is None:  # built where it runs: in each worker process
            from clipjax.data.tokenizers import build_tokenizer

            self._tokenizer = build_tokenizer(self.model_cfg)
        return self._tokenizer

    def example(self, record: dict, rng: np.random.Generator) -> dict:
        """Raises decode.BadSample for a sample to skip."""
        if record.get("error"):
            raise decode.BadSample(record["error"])
        if self.labels and record.get("label") is None:
            raise decode.BadSample("no_label")
        candidates = decode.caption_candidates(
            record["text"], split_lines=record.get("caption_lines", False))
        caption = decode.pick_caption(candidates, record.get("caption_choice", "random"), rng)
        image = record["image"]
        if isinstance(image, np.ndarray):
            pil = decode.array_image(image)
        else:
            pil = decode.open_image(image, self.max_pixels)
        pixels = self.crop(pil, rng)
        tokens = np.asarray(self.tokenizer(caption), np.int32).reshape(-1)
        out = {"image": pixels, "text": tokens}
        if self.labels:
            out["label"] = np.int32(record["label"])
        if self.keep is not None:
            out["patches"] = keep_indices(rng, *self.keep)
        return out

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        try:
            return self.example(record, rng)
        except decode.BadSample as e:
            return {"skip": e.reason, "key": record.get("key", "?")}


def keep_indices(rng: np.random.Generator, patches: int, keep: int) -> np.ndarray:
    """Sorted int32 [keep]: a uniformly random subset of the `patches` token indices
    (FLIP patch dropout; the class token is not among them, it is always kept)."""
    return np.sort(rng.permutation(patches)[:keep]).astype(np.int32)


AUGMENT_STREAM = 2  # EpochOrder draws with [seed, epoch] and [seed, epoch, window, 1]


def sample_rng(draw) -> np.random.Generator:
    """The generator of every random draw of one sample (crop, flip, caption choice):
    a function of (stream seed, epoch, position in the epoch) only, so any number of
    processes, workers and threads draws the same for the same sample."""
    seed, epoch, j = (int(v) for v in draw)
    return np.random.Generator(np.random.PCG64(
        np.random.SeedSequence([seed, epoch, j, AUGMENT_STREAM])))


class PositionSeeded:
    """(record) -> example: runs `transform(record, sample_rng(record["_draw"]))` and
    carries the record's stream index `_n` (the pipeline's resume position) along."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, record: dict) -> dict:
        out = self.transform(record, sample_rng(record["_draw"]))
        out["_n"] = record["_n"]
        return out


def _merge_counts(into: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + int(v)


class _SkipCountingBatchIterator(grain.DatasetIterator):
    def __init__(self, parent, batch_size: int, mean, std, drop_remainder: bool,
                 give_up_after: int):
        super().__init__(parent)
        self.batch_size = batch_size
        self.mean, self.std = mean, std
        self.drop_remainder = drop_remainder
        self.give_up_after = give_up_after
        self._bad_run = 0
        self._reasons: dict[str, int] = {}
        self._next_record = -1

    def __next__(self) -> dict:
        images, texts, skipped, bad = [], [], {}, []
        extras: dict[str, list] = {}  # "label", "patches": what the transform adds
        next_record = None
        while len(images) < self.batch_size:
            try:
                ex = next(self._parent)
            except StopIteration:
                if self.drop_remainder or (not images and not skipped):
                    raise
                break
            next_record = int(ex.get("_n", -1)) + 1
            if is_skip(ex):
                skipped[ex["skip"]] = skipped.get(ex["skip"], 0) + 1
                if len(bad) < MAX_BAD_KEYS:
                    bad.append([ex["key"], ex["skip"]])
                self._give_up_check(ex["skip"])
                continue
            self._bad_run = 0
            images.append(ex["image"])
            texts.append(ex["text"])
            for k in EXTRA_KEYS:
                if k in ex:
                    extras.setdefault(k, []).append(ex[k])
        # `_next`: the stream index after the last record this batch consumed, i.e. where
        # a pipeline resumed after this batch starts (whatever prefetches downstream).
        if next_record is not None:
            self._next_record = next_record
        out = {"image": self._pixels(images), "text": _stack_tokens(texts),
               "_skipped": skipped, "_bad": bad, "_next": next_record}
        out.update({k: np.stack(v) for k, v in extras.items()})
        return out

    def _give_up_check(self, reason: str) -> None:
        """An endless stream with no valid sample would otherwise spin forever."""
        self._bad_run += 1
        self._reasons[reason] = self._reasons.get(reason, 0) + 1
        if self.give_up_after and self._bad_run > self.give_up_after:
            raise ClipjaxError(
                f"no valid sample in the last {self._bad_run} records (skipped: "
                f"{self._reasons}); check the data with `clipjax data check`")

    def _pixels(self, images: Sequence[np.ndarray]) -> np.ndarray:
        raw = self.mean is None  # uint8 out: the consumer normalises (on the device)
        if not images:
            return np.zeros((0, 0, 0, 3), np.uint8 if raw else np.float32)
        stacked = np.stack(images)
        return stacked if raw else normalize(stacked, self.mean, self.std)

    def get_state(self):
        # Cheap (prefetching iterators above copy it after every batch): the pipeline is
        # positioned by rebuilding it at `next_record`, never through grain's states.
        return {"next_record": self._next_record}

    def set_state(self, state):
        raise NotImplementedError(
            "SkipCountingBatch is positioned by rebuilding the pipeline at next_record")


def _stack_tokens(texts):
    if not texts:
        return np.zeros((0, 0), np.int32)
    return np.stack(texts).astype(np.int32, copy=False)


class SkipCountingBatch(grain.IterDataset):
    """Batches of exactly `batch_size` good examples (the last may be short when finite).

    Images are normalised with `mean`/`std`; with both None they stay uint8."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, mean, std, *,
                 drop_remainder: bool = False, give_up_after: int = 0):
        super().__init__(parent)
        self.batch_size = int(batch_size)
        self.mean = None if mean is None else tuple(mean)
        self.std = None if std is None else tuple(std)
        self.drop_remainder = drop_remainder
        self.give_up_after = int(give_up_after)  # consecutive skips; 0 = never

    def __iter__(self):
        return _SkipCountingBatchIterator(self._parent.__iter__(), self.batch_size, self.mean,
                                          self.std, self.drop_remainder, self.give_up_after)

    def __str__(self) -> str:
        return f"SkipCountingBatch(batch_size={self.batch_size})"
