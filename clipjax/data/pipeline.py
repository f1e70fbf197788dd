"""The training input pipeline: config -> grain iterator of host-local numpy batches.

    source(s) -> ProcessStream (per-process blocks of the global order)  [-> mix by weight]
      -> _Numbered [start:]                stream index `_n`: the resume position
      -> map(PositionSeeded(TrainTransform)) decode, crop, tokenize; draws from
                                           (seed, epoch, global position)
      -> to_iter_dataset(data.threads)     decode threads
      -> mp_prefetch(data.workers)         worker processes, read back in stream order
      -> SkipCountingBatch                 b good examples, skip counts (main process)
      -> ThreadPrefetch(data.prefetch)     batches ahead
      -> TrainPipeline                     strips and accumulates the counts; checkpointable

Batches are `{"image": float32 [b,S,S,3], "text": int32 [b,L]}` (plus "label" int32 [b]
for `loss.positives='label'` and "patches" int32 [b,k] for `model.image.patch_dropout`) with
b = data.batch_size / process_count; process p's batch k is rows p·b .. (p+1)·b of the
batch a single process would read, augmentation included. Batching happens after the
workers, so neither the batches nor the saved state depend on data.workers,
data.threads or data.prefetch.

The state (`get_state`) is `{"next_record": stream index to resume at, "process_index",
"process_count", "batch_size" (local), "skipped", "first_bad"}`, the same keys for any
number of workers; `save_args()` / `restore_args()` hand it to orbax as the trainer's
"data" item, and a restored pipeline yields exactly the batches the uninterrupted one
would have.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import re
import signal
import sys
import weakref
from collections.abc import Callable
from typing import Any

import grain
import numpy as np
from ml_collections import ConfigDict

from clipjax.data import sources as sources_lib
from clipjax.data.transform import PositionSeeded, SkipCountingBatch, TrainTransform, keep_indices
from clipjax.errors import ClipjaxError, ConfigError, WorkerDied

log = logging.getLogger(__name__)

LOG_FIRST_BAD = 5
STATE_KEYS = ("next_record", "process_index", "process_count", "batch_size")
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live() -> None:
    """Stops worker processes and threads before the interpreter tears modules down."""
    for p in list(_LIVE):
        p.close()
        p._it = None  # collect grain's iterators now, while their modules still exist


class TrainPipeline(grain.DatasetIterator):
    """Iterator of batches with `.skipped` (reason -> count) and orbax checkpoint args.

    `make(start)` builds the grain iterator that begins at stream index `start`; it is
    built on the first `next` (or again after `set_state`), so restoring a state never
    starts workers for a position that is then thrown away.
    """

    def __init__(self, make: Callable[[int], grain.DatasetIterator], *, batch_size: int,
                 num_samples: int, startup_skipped: dict[str, int] | None = None,
                 process_index: int = 0, process_count: int = 1):
        super().__init__()
        self._make = make
        self._it: grain.DatasetIterator | None = None
        self.next_record = 0
        self.batch_size = batch_size
        self.process_index, self.process_count = process_index, process_count
        self.num_samples = num_samples  # one epoch of the (mixed) source, all processes
        self.skipped: dict[str, int] = dict(startup_skipped or {})
        self.first_bad: list[str] = []
        self.keep_bad = LOG_FIRST_BAD  # how many bad keys to keep (and log)
        self._workers: list | None = None  # the worker processes (multiprocessing.Process)
        self._others: set[int] = set()
        _LIVE.add(self)

    def _inner(self) -> grain.DatasetIterator:
        if self._it is None:
            self._assert_not_closed()
            # Workers start on the first `next`: those alive now belong to other pipelines.
            self._others = {c.pid for c in _grain_workers()}
            self._workers = None
            self._it = self._make(self.next_record)
        return self._it

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            # A dead worker is noticed here, at the next batch: grain itself would notice
            # only once the batches already buffered from it are used up.
            _check_workers(self._workers)  # (and stops the others of this pipeline)
            try:
                batch = next(self._inner())
            except RuntimeError as e:
                if WORKER_DIED not in str(e):
                    raise
                match = re.search(r"exit code (-?\d+)", str(e))
                raise _worker_death(int(match.group(1)) if match else None, None,
                                    self._workers) from None
            if self._workers is None:  # this iterator's worker processes, now started
                self._workers = [c for c in _grain_workers() if c.pid not in self._others]
            nxt = batch.pop("_next")
            if nxt is not None:
                self.next_record = int(nxt)
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
        return {"next_record": int(self.next_record), "process_index": self.process_index,
                "process_count": self.process_count, "batch_size": self.batch_size,
                "skipped": dict(self.skipped), "first_bad": list(self.first_bad)}

    def set_state(self, state: dict[str, Any]) -> None:
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ClipjaxError(
                f"the saved data-iterator state lacks {missing} (it was written by an older "
                "clipjax, whose state depended on data.workers); it cannot position this "
                "pipeline")
        mine = {"process_index": self.process_index, "process_count": self.process_count,
                "batch_size": self.batch_size}
        for k, v in mine.items():
            if int(state[k]) != v:
                raise ClipjaxError(
                    f"the saved data-iterator state was written with {k}={state[k]}, this "
                    f"pipeline has {k}={v}: its position would mean other samples")
        if self._it is not None:
            self._it.close()
            self._it = None
        self._workers = None
        self.next_record = int(state["next_record"])
        self.skipped = {str(k): int(v) for k, v in state["skipped"].items()}
        self.first_bad = list(state["first_bad"])

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
        super().close()

    def save_args(self):
        """orbax args that save this iterator's state (grain's checkpoint handler)."""
        return grain.checkpoint.CheckpointSave(self)

    def restore_args(self):
        """orbax args that restore into this iterator (it then continues from there)."""
        return grain.checkpoint.CheckpointRestore(self)

    def __str__(self) -> str:
        return f"TrainPipeline(batch_size={self.batch_size})"


class _Numbered(grain.MapDataset):
    """Adds `_n`, the record's index in this (per-process, possibly mixed) stream."""

    def __init__(self, parent: grain.MapDataset):
        super().__init__(parent)

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return "_Numbered"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        record = dict(self._parent[index])
        record["_n"] = int(index)
        return record


# --------------------------------------------------------------------------- synthetic


class SyntheticBatch:
    """Random images (normalised float32, or uint8 pixels) and token rows (SOT ... EOT,
    zero padding) of a batch."""

    def __init__(self, batch: int, image_size: int, context_length: int, *, vocab_size: int,
                 normalized: bool = True, keep: tuple[int, int] | None = None,
                 classes: int = 0):
        self.shape = (batch, image_size, image_size, 3)
        self.length, self.vocab = context_length, vocab_size
        self.normalized = normalized
        self.keep, self.classes = keep, classes

    def __call__(self, index, rng: np.random.Generator) -> dict:
        b, length = self.shape[0], self.length
        if self.normalized:
            images = rng.standard_normal(self.shape, dtype=np.float32)
        else:
            images = rng.integers(0, 256, self.shape, dtype=np.uint8)
        lengths = rng.integers(2, length + 1, size=b)
        body = rng.integers(1, max(self.vocab - 2, 2), size=(b, length), dtype=np.int32)
        pos = np.arange(length)[None, :]
        text = np.where(pos < lengths[:, None], body, 0).astype(np.int32)
        text[:, 0] = self.vocab - 2
        text[np.arange(b), lengths - 1] = self.vocab - 1
        out = {"image": images, "text": text, "_skipped": {}, "_bad": [],
               "_next": int(index) + 1}
        if self.classes:
            out["label"] = rng.integers(0, self.classes, size=b).astype(np.int32)
        if self.keep is not None:
            out["patches"] = np.stack([keep_indices(rng, *self.keep) for _ in range(b)])
        return out


# --------------------------------------------------------------------------- building


def patch_keep(model_cfg: ConfigDict) -> tuple[int, int] | None:
    """(patches, kept) under `model.image.patch_dropout`; None when nothing is dropped."""
    from clipjax.config import kept_patches

    img = model_cfg.image
    if img.kind != "vit" or not float(img.get("patch_dropout", 0.0)):
        return None
    patches = (img.image_size // img.patch_size) ** 2
    return patches, kept_patches(patches, img.patch_dropout)


def local_batch_size(config: ConfigDict, process_count: int) -> int:
    b = int(config.data.batch_size)
    if b % process_count:
        raise ConfigError(
            "data.batch_size", f"{b} does not split evenly over {process_count} processes")
    return b // process_count


def _seed(config: ConfigDict) -> int:
    return int(config.train.seed) & 0x7FFFFFFF


def build_stream(config: ConfigDict, *, process_index: int = 0, process_count: int = 1,
                 epochs: int | None = None, shuffle: bool = True, block: int = 1):
    """The per-process MapDataset of raw records (a weighted mix for `mixture`);
    `block` is the local batch size (see `sources.ProcessStream`).

    Returns (dataset, num_samples, startup_skipped).
    """
    train = config.data.train
    seed = _seed(config)
    common = dict(process_index=process_index, process_count=process_count, epochs=epochs,
                  shuffle=shuffle, block=block)
    if train.source == "mixture":
        comps = sources_lib.mixture_components(train)
        streams, weights, total, skipped = [], [], 0, {}
        for i, (section, weight) in enumerate(comps):
            src = sources_lib.build_source(section, index_cache=config.data.index_cache,
                                           where=f"data.train.mixture[{i}]")
            streams.append(sources_lib.ProcessStream(
                src, seed=seed + 7919 * (i + 1), window=section["shuffle_window"], **common))
            weights.append(weight)
            total += len(src)
            for k, v in src.startup_skipped.items():
                skipped[k] = skipped.get(k, 0) + v
        return grain.MapDataset.mix(streams, weights), total, skipped
    src = sources_lib.build_source(train, index_cache=config.data.index_cache)
    ds = sources_lib.ProcessStream(src, seed=seed, window=train.shuffle_window, **common)
    return ds, len(src), dict(src.startup_skipped)


def build_train_pipeline(config: ConfigDict, *, process_index: int = 0, process_count: int = 1,
                         epochs: int | None = None, tokenizer=None,
                         workers: int | None = None, shuffle: bool = True,
                         normalize: bool = True) -> TrainPipeline:
    """The training iterator for this process (see the module docstring).

    `epochs=None` repeats forever (training); an integer stops after this
    process's share of that many epochs (the last batch may then be short).
    `tokenizer` overrides `build_tokenizer(config.model)`; `workers` overrides
    `data.workers`; `shuffle=False` reads in storage order (checks).
    `normalize=False` leaves images uint8 (a quarter of the bytes to the device; the
    trainer normalises inside its jitted step).
    """
    data = config.data
    b = local_batch_size(config, process_count)
    workers = int(data.workers if workers is None else workers)
    prefetch = int(data.prefetch)
    img = config.model.image
    seed = _seed(config)
    if data.train.source == "synthetic":
        length = sys.maxsize if epochs is None else int(epochs)
        make = SyntheticBatch(b, img.image_size, config.model.text.context_length,
                              vocab_size=config.model.text.vocab_size, normalized=normalize,
                              keep=patch_keep(config.model),
                              classes=10 if config.loss.positives == "label" else 0)
        batches = grain.MapDataset.range(length).random_map(
            make, seed=(seed * 1000003 + process_index) & 0x7FFFFFFF)

        def build(start: int) -> grain.DatasetIterator:
            it = batches[start:].to_iter_dataset(grain.ReadOptions(num_threads=0))
            if workers > 0:
                _absl_flags_ready()
                it = it.mp_prefetch(grain.MultiprocessingOptions(
                    num_workers=workers, per_worker_buffer_size=max(1, prefetch)),
                    worker_init_fn=_worker_init)
            elif prefetch > 0:
                it = grain.experimental.ThreadPrefetchIterDataset(
                    it, prefetch_buffer_size=prefetch)
            return iter(it)

        return TrainPipeline(build, batch_size=b, num_samples=0, process_index=process_index,
                             process_count=process_count)

    stream, num_samples, skipped = build_stream(
        config, process_index=process_index, process_count=process_count, epochs=epochs,
        shuffle=shuffle, block=b)
    try:
        transform = TrainTransform(config.model, data.augment,
                                   max_pixels=data.max_image_pixels, tokenizer=tokenizer,
                                   labels=config.loss.positives == "label",
                                   keep=patch_keep(config.model))
    except ValueError as e:
        raise ConfigError("data.augment", str(e)) from None
    numbered = _Numbered(stream)
    threads = int(data.threads)
    mean, std = (img.mean, img.std) if normalize else (None, None)
    # Ten epochs in a row without one valid sample: the data is broken, not unlucky.
    give_up = 10 * num_samples + 1000

    def build(start: int) -> grain.DatasetIterator:
        ds = numbered[start:].map(PositionSeeded(transform))
        it = ds.to_iter_dataset(grain.ReadOptions(
            num_threads=threads, prefetch_buffer_size=max(4 * threads, min(b, 256))))
        if workers > 0:
            # Examples (not batches) come back from the workers, interleaved in stream
            # order: the batches below do not depend on the number of workers.
            _absl_flags_ready()
            it = it.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=workers,
                per_worker_buffer_size=min(1024, max(1, prefetch) * max(1, -(-b // workers)))),
                worker_init_fn=_worker_init)
        it = SkipCountingBatch(it, b, mean, std, drop_remainder=False, give_up_after=give_up)
        if prefetch > 0:
            it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
        return iter(it)

    return TrainPipeline(build, batch_size=b, num_samples=num_samples, startup_skipped=skipped,
                         process_index=process_index, process_count=process_count)


WORKER_DIED = "Worker process was terminated unexpectedly"


def _worker_init(index: int, count: int) -> None:
    """In each data worker: a Ctrl-C at the terminal reaches the whole process group, and
    the trainer (not its workers) decides what it means, so workers ignore SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _grain_workers() -> list:
    import multiprocessing

    return [c for c in multiprocessing.active_children() if c.name.startswith("grain-")]


def _check_workers(workers: list | None) -> None:
    for proc in workers or ():
        code = proc.exitcode  # a non-blocking waitpid
        if code is not None and code != 0:
            raise _worker_death(code, proc.pid, workers)


def _worker_death(code: int | None, pid: int | None, workers: list | None) -> WorkerDied:
    """A dead worker as one line naming it and its signal; the pipeline's surviving
    workers are stopped now (grain would wait 25 s for each)."""
    how = f"exit code {code}" if code is not None else "an unknown exit status"
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            how = f"signal {signal.Signals(-code).name} (exit code {code})"
    for child in workers or ():
        if child.exitcode is None:
            child.kill()
    which = f" (pid {pid})" if pid else ""
    return WorkerDied(
        f"a data worker process{which} died of {how}; the input pipeline cannot continue. "
        "Run the same command to resume from the last checkpoint (if the system killed it "
        "for memory, lower data.workers or data.threads)")


def _absl_flags_ready() -> None:
    """grain's worker start-up reads absl flags; outside absl.app they are unparsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
