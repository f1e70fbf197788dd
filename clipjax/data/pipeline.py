"""The training input pipeline: config -> grain iterator of host-local numpy batches.

    source(s) -> ProcessStream (per-process, per-epoch order)  [-> mix by weight]
      -> random_map(TrainTransform)     decode, crop, tokenize  (seeded by position)
      -> SkipCountingBatch              b good examples, skip counts attached
      -> mp_prefetch(data.workers)      worker processes, deterministic interleave
      -> TrainPipeline                  strips and accumulates the counts; checkpointable

Batches are `{"image": float32 [b,S,S,3], "text": int32 [b,L]}` with
b = data.batch_size / process_count. The state (`get_state`) is grain's
iterator state plus the skip counts; `save_args()` / `restore_args()` hand it
to orbax as the trainer's "data" item, and a restored pipeline yields exactly
the batches the uninterrupted one would have.
"""

from __future__ import annotations

import atexit
import logging
import sys
import weakref
from typing import Any

import grain
import numpy as np
from ml_collections import ConfigDict

from clipjax.data import sources as sources_lib
from clipjax.data.transform import SkipCountingBatch, TrainTransform
from clipjax.errors import ConfigError

log = logging.getLogger(__name__)

LOG_FIRST_BAD = 5
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live() -> None:
    """Stops worker processes and threads before the interpreter tears modules down."""
    for p in list(_LIVE):
        p.close()
        p._parents = ()  # collect grain's iterators now, while their modules still exist


class TrainPipeline(grain.DatasetIterator):
    """Iterator of batches with `.skipped` (reason -> count) and orbax checkpoint args."""

    def __init__(self, inner: grain.DatasetIterator, *, batch_size: int, num_samples: int,
                 startup_skipped: dict[str, int] | None = None):
        super().__init__(inner)
        self.batch_size = batch_size
        self.num_samples = num_samples  # one epoch of the (mixed) source, all processes
        self.skipped: dict[str, int] = dict(startup_skipped or {})
        self.first_bad: list[str] = []
        self.keep_bad = LOG_FIRST_BAD  # how many bad keys to keep (and log)
        _LIVE.add(self)

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            batch = next(self._parent)
            self._account(batch.pop("_skipped"), batch.pop("_bad"))
            if len(batch["text"]):
                return batch

    def _account(self, skipped: dict[str, int], bad: list) -> None:
        for k, v in skipped.items():
            self.skipped[k] = self.skipped.get(k, 0) + int(v)
        for key, reason in bad:
            if len(self.first_bad) >= self.keep_bad:
                break
            self.first_bad.append(key)
            log.warning("skipping bad sample %s: %s", key, reason)

    def get_state(self) -> dict[str, Any]:
        return {"inner": self._parent.get_state(), "skipped": dict(self.skipped),
                "first_bad": list(self.first_bad)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["inner"])
        self.skipped = {str(k): int(v) for k, v in state["skipped"].items()}
        self.first_bad = list(state["first_bad"])

    def save_args(self):
        """orbax args that save this iterator's state (grain's checkpoint handler)."""
        return grain.checkpoint.CheckpointSave(self)

    def restore_args(self):
        """orbax args that restore into this iterator (it then continues from there)."""
        return grain.checkpoint.CheckpointRestore(self)

    def __str__(self) -> str:
        return f"TrainPipeline(batch_size={self.batch_size})"


# --------------------------------------------------------------------------- synthetic


class SyntheticBatch:
    """Random normalised images and token rows (SOT ... EOT, zero padding) of a batch."""

    def __init__(self, batch: int, image_size: int, context_length: int, vocab_size: int):
        self.shape = (batch, image_size, image_size, 3)
        self.length, self.vocab = context_length, vocab_size

    def __call__(self, _index, rng: np.random.Generator) -> dict:
        b, length = self.shape[0], self.length
        images = rng.standard_normal(self.shape, dtype=np.float32)
        lengths = rng.integers(2, length + 1, size=b)
        body = rng.integers(1, max(self.vocab - 2, 2), size=(b, length), dtype=np.int32)
        pos = np.arange(length)[None, :]
        text = np.where(pos < lengths[:, None], body, 0).astype(np.int32)
        text[:, 0] = self.vocab - 2
        text[np.arange(b), lengths - 1] = self.vocab - 1
        return {"image": images, "text": text, "_skipped": {}, "_bad": []}


# --------------------------------------------------------------------------- building


def local_batch_size(config: ConfigDict, process_count: int) -> int:
    b = int(config.data.batch_size)
    if b % process_count:
        raise ConfigError(
            "data.batch_size", f"{b} does not split evenly over {process_count} processes")
    return b // process_count


def _seed(config: ConfigDict) -> int:
    return int(config.train.seed) & 0x7FFFFFFF


def build_stream(config: ConfigDict, *, process_index: int = 0, process_count: int = 1,
                 epochs: int | None = None, shuffle: bool = True):
    """The per-process MapDataset of raw records (a weighted mix for `mixture`).

    Returns (dataset, num_samples, startup_skipped).
    """
    train = config.data.train
    seed = _seed(config)
    if train.source == "mixture":
        comps = sources_lib.mixture_components(train)
        streams, weights, total, skipped = [], [], 0, {}
        for i, (section, weight) in enumerate(comps):
            src = sources_lib.build_source(section, index_cache=config.data.index_cache,
                                           where=f"data.train.mixture[{i}]")
            streams.append(sources_lib.ProcessStream(
                src, seed=seed + 7919 * (i + 1), window=section["shuffle_window"],
                process_index=process_index, process_count=process_count, epochs=epochs,
                shuffle=shuffle))
            weights.append(weight)
            total += len(src)
            for k, v in src.startup_skipped.items():
                skipped[k] = skipped.get(k, 0) + v
        return grain.MapDataset.mix(streams, weights), total, skipped
    src = sources_lib.build_source(train, index_cache=config.data.index_cache)
    ds = sources_lib.ProcessStream(
        src, seed=seed, window=train.shuffle_window, process_index=process_index,
        process_count=process_count, epochs=epochs, shuffle=shuffle)
    return ds, len(src), dict(src.startup_skipped)


def build_train_pipeline(config: ConfigDict, *, process_index: int = 0, process_count: int = 1,
                         epochs: int | None = None, tokenizer=None,
                         workers: int | None = None, shuffle: bool = True) -> TrainPipeline:
    """The training iterator for this process (see the module docstring).

    `epochs=None` repeats forever (training); an integer stops after this
    process's share of that many epochs (the last batch may then be short).
    `tokenizer` overrides `build_tokenizer(config.model)`; `workers` overrides
    `data.workers`; `shuffle=False` reads in storage order (checks).
    """
    data = config.data
    b = local_batch_size(config, process_count)
    workers = int(data.workers if workers is None else workers)
    img = config.model.image
    seed = _seed(config)
    if data.train.source == "synthetic":
        length = sys.maxsize if epochs is None else int(epochs)
        make = SyntheticBatch(b, img.image_size, config.model.text.context_length,
                              config.model.text.vocab_size)
        ds = grain.MapDataset.range(length).random_map(
            make, seed=(seed * 1000003 + process_index) & 0x7FFFFFFF)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))
        num_samples, skipped = 0, {}
    else:
        stream, num_samples, skipped = build_stream(
            config, process_index=process_index, process_count=process_count, epochs=epochs,
            shuffle=shuffle)
        try:
            transform = TrainTransform(config.model, data.augment,
                                       max_pixels=data.max_image_pixels, tokenizer=tokenizer)
        except ValueError as e:
            raise ConfigError("data.augment", str(e)) from None
        threads = int(data.threads)
        ds = stream.random_map(transform, seed=seed)
        it = ds.to_iter_dataset(grain.ReadOptions(
            num_threads=threads, prefetch_buffer_size=max(4 * threads, min(b, 256))))
        # Ten epochs in a row without one valid sample: the data is broken, not unlucky.
        it = SkipCountingBatch(it, b, img.mean, img.std, drop_remainder=False,
                               give_up_after=10 * num_samples + 1000)
    if workers > 0:
        _absl_flags_ready()
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=max(1, int(data.prefetch))))
    elif data.prefetch > 0:
        it = grain.experimental.ThreadPrefetchIterDataset(
            it, prefetch_buffer_size=int(data.prefetch))
    return TrainPipeline(iter(it), batch_size=b, num_samples=num_samples,
                         startup_skipped=skipped)


def _absl_flags_ready() -> None:
    """grain's worker start-up reads absl flags; outside absl.app they are unparsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
