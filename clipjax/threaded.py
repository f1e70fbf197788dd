"""The one way clipjax overlaps image decoding with the model: a thread pool (PIL and
numpy release the GIL) mapping a function over items in order, one batch queued ahead
of the batch in use, plus a background-thread prefetch for whole pipelines. Evaluation,
inference, embedding and curation all prepare their images through it."""

from __future__ import annotations

import collections
import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_batches(fn: Callable[[T], R], items: Iterable[T], batch_size: int,
                pool: Executor, ahead: int = 1) -> Iterator[tuple[list[R], bool]]:
    """(results, last) per run of `batch_size` items, in input order, with `ahead`
    batches queued behind the one handed out; `last` is True for the final batch
    (known because the next one would already be queued). Items are pulled lazily, so
    a stream of any length holds `ahead + 1` batches at a time."""
    it = iter(items)
    pending: collections.deque = collections.deque()

    def submit() -> bool:
        chunk = list(itertools.islice(it, max(1, int(batch_size))))
        if chunk:
            pending.append([pool.submit(fn, x) for x in chunk])
        return bool(chunk)

    more = submit()
    while pending:
        while more and len(pending) <= max(1, int(ahead)):
            more = submit()
        futures = pending.popleft()
        yield [f.result() for f in futures], not pending


def map_ordered(fn: Callable[[T], R], items: list[T], workers: int) -> list[R]:
    """fn over a list on `workers` threads (in the caller's thread when one will do)."""
    if len(items) < 2 or workers < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def prefetch(it: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Runs an iterator in a background thread, `depth` items ahead; its exception is
    raised in the consumer."""
    q: queue.Queue = queue.Queue(depth)
    end = object()

    def work():
        try:
            for item in it:
                q.put(item)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)
        q.put(end)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = q.get()
        if item is end:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
