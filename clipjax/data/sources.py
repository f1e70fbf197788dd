"""Random-access sources of raw records, and the per-process epoch order over them.

A source exposes `sizes` (samples per shard; non-tar sources use virtual shards)
and `read(shard, i)` -> a raw record::

    {"key": str, "image": bytes | uint8 array | None, "text": bytes | str | list | None,
     "error": reason | None, "caption_choice": "random" | "first", "caption_lines": bool}

`ProcessStream` turns a source into the infinite (or `epochs`-long) stream one
process reads: epoch e is a permutation drawn from (seed, e) — shard order
first, then the samples of each window of `window` shards shuffled together —
and process p of P takes the p-th block of `block` (its batch size) positions of
every P·block. So processes are disjoint, their union is every epoch in turn, P
processes read exactly the global batches of one, and a sample's place (and its
random draws) depend only on (seed, position): what makes resume exact.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import sys
import threading
from collections.abc import Sequence

import grain
import numpy as np
from ml_collections import ConfigDict

from clipjax import paths
from clipjax.data import captions as captions_lib
from clipjax.data import folder as folder_lib
from clipjax.data import tfds_reader
from clipjax.data import webdataset as wds
from clipjax.errors import ClipjaxError, ConfigError

log = logging.getLogger(__name__)

VIRTUAL_SHARD = 1 << 16  # samples per virtual shard of tfds / folder sources


class Source:
    """Base: `sizes`, `read(shard, i)`, start-up skips and caption options."""

    name = "source"
    sizes: list[int]
    startup_skipped: dict[str, int]

    def __init__(self, caption_choice: str = "random", caption_lines: bool = False):
        self.caption_choice = caption_choice
        self.caption_lines = caption_lines
        self.startup_skipped = {}

    def __len__(self) -> int:
        return int(sum(self.sizes))

    def _record(self, key, image, text, error=None, label=None) -> dict:
        rec = {"key": key, "image": image, "text": text, "error": error,
               "caption_choice": self.caption_choice, "caption_lines": self.caption_lines}
        if label is not None:
            rec["label"] = int(label)
        return rec

    def records(self):
        """Every record in storage order (converters and checks)."""
        for shard, n in enumerate(self.sizes):
            for i in range(n):
                yield self.read(shard, i)

    def read(self, shard: int, i: int) -> dict:
        raise NotImplementedError


def _virtual_sizes(n: int) -> list[int]:
    full, rest = divmod(n, VIRTUAL_SHARD)
    return [VIRTUAL_SHARD] * full + ([rest] if rest else [])


class WebdatasetSource(Source):
    name = "webdataset"

    def __init__(self, urls, *, cache_dir: str = "", **kw):
        super().__init__(**kw)
        self.urls = [paths.canonical(u) for u in wds.expand_urls(urls)]
        cache_dir = paths.canonical(cache_dir) if cache_dir else ""
        listing = wds.check_urls_exist(self.urls)
        if not cache_dir and any(paths.is_remote(u) for u in self.urls):
            log.warning(
                "webdataset shards on %s without data.index_cache: every process (and "
                "decode worker) indexes each shard it reads itself, a full pass over the "
                "shard; set data.index_cache to a shared directory (gs://...) to index "
                "each shard once", paths.protocol(self.urls[0]) + "://")
        self.sizes, self.startup_skipped = wds.shard_sizes(self.urls, cache_dir, listing)
        self.shards = wds.TarShards(self.urls, self.sizes, cache_dir=cache_dir,
                                    identities=[listing.identity(u) for u in self.urls])

    def read(self, shard, i):
        r = self.shards.read(shard, i)
        return self._record(r["key"], r["image"], r["text"], r["error"], wds.sample_label(r))


class FolderSource(Source):
    name = "folder"

    def __init__(self, path: str, *, templates=(), **kw):
        super().__init__(**kw)
        self.listing = folder_lib.scan_folder(path)
        self.templates = captions_lib.check_templates(templates)
        self.sizes = _virtual_sizes(len(self.listing))
        self._names = [captions_lib.clean_classname(c) for c in self.listing.classnames]

    def read(self, shard, i):
        j = shard * VIRTUAL_SHARD + i
        lst = self.listing
        image = folder_lib.read_bytes(f"{lst.root}/{lst.files[j]}")
        label = None
        if lst.kind == "classes":
            label = lst.labels[j]
            text = captions_lib.class_captions(self._names[label], self.templates)
        else:
            text = folder_lib.read_bytes(lst.captions[j]) if lst.captions[j] else None
        return self._record(lst.files[j], image, text,
                            None if image is not None else "read_error", label)

    @property
    def classnames(self) -> list[str]:
        return self._names


def _nested(example, key: str):
    node = example
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


class TfdsSource(Source):
    """A TFDS dataset through `tfds.data_source` (array_record; no TensorFlow needed).

    Images are read undecoded (SkipDecoding) so the bomb check sees the header
    first. Captions come from `caption_key` ('a/b' for nested features); without
    one, class labels (`label_key`) become captions through the templates.
    """

    name = "tfds"

    def __init__(self, name: str, *, split: str = "train", data_dir: str = "",
                 image_key: str = "image", caption_key: str = "caption",
                 label_key: str = "label", templates=(), **kw):
        super().__init__(**kw)
        self.spec = dict(name=name, split=split, image_key=image_key,
                         data_dir=paths.canonical(data_dir) if data_dir else "")
        self.caption_key, self.label_key = caption_key, label_key
        ds = self._source()
        self.__dict__["_ds"] = ds
        features = ds.dataset_info.features
        top = caption_key.split("/", 1)[0]
        self.use_labels = not (caption_key and top in features)
        self.classnames: list[str] = []
        if self.use_labels:
            names = tfds_reader.class_names(ds, label_key)
            if not names:
                raise ClipjaxError(
                    f"tfds {name}: no caption feature {caption_key!r} and no class-label "
                    f"feature {label_key!r} (features: {', '.join(features.keys())})")
            self.classnames = names
            self.templates = captions_lib.check_templates(templates)
        if image_key not in features:
            raise ClipjaxError(f"tfds {name}: no image feature {image_key!r}")
        self.sizes = _virtual_sizes(len(ds))

    @functools.cached_property
    def _ds(self):
        return self._source()

    def _source(self):
        s = self.spec
        return tfds_reader.open_source(s["name"], s["split"], s["data_dir"], s["image_key"])

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_ds", None)
        return state

    def read(self, shard, i):
        j = shard * VIRTUAL_SHARD + i
        key = f"{self.spec['name']}/{self.spec['split']}#{j}"
        try:
            ex = self._ds[j]
        except Exception:  # noqa: BLE001 - a corrupt record is a skipped sample
            return self._record(key, None, None, "read_error")
        image = tfds_reader.encoded_image(ex, self.spec["image_key"])
        label = None
        if self.use_labels:
            label = _nested(ex, self.label_key)
            text = captions_lib.class_captions(self.classnames[int(label)], self.templates)
        else:
            text = _nested(ex, self.caption_key)
            if isinstance(text, np.ndarray):
                text = list(text.reshape(-1))
        return self._record(key, image, text, label=label)


class IdxSource(Source):
    """MNIST-style IDX images + labels; captions from class names through templates."""

    name = "idx"

    def __init__(self, directory: str, *, split: str = "train", classnames=(), templates=(),
                 **kw):
        from clipjax.data import idx as idx_lib

        super().__init__(**kw)
        self.images, self.labels = idx_lib.load_split(directory, split)
        names = tuple(classnames) or idx_lib.default_classes(directory)
        if int(self.labels.max(initial=0)) >= len(names):
            raise ClipjaxError(
                f"{directory}: label {int(self.labels.max())} but only {len(names)} class names")
        self.classnames = [captions_lib.clean_classname(n) for n in names]
        self.templates = captions_lib.check_templates(templates)
        self.split = split
        self.sizes = _virtual_sizes(len(self.labels))

    def read(self, shard, i):
        j = shard * VIRTUAL_SHARD + i
        label = int(self.labels[j])
        text = captions_lib.class_captions(self.classnames[label], self.templates)
        return self._record(f"idx/{self.split}#{j}", self.images[j], text, label=label)


# --------------------------------------------------------------------------- config -> source

_SOURCE_KEYS = ("source", "urls", "name", "split", "data_dir", "path", "caption_key",
                "label_key", "image_key", "caption_choice", "caption_lines", "templates",
                "shuffle_window")


def build_source(train: ConfigDict | dict, *, index_cache: str = "", where: str = "data.train"
                 ) -> Source:
    """One (non-mixture) source from a data.train-like section."""
    kind = train["source"]
    kw = dict(caption_choice=train["caption_choice"], caption_lines=bool(train["caption_lines"]))
    if kind == "webdataset":
        if not train["urls"]:
            raise ConfigError(f"{where}.urls", "webdataset source needs shard paths")
        return WebdatasetSource(train["urls"], cache_dir=index_cache, **kw)
    if kind == "folder":
        if not train["path"]:
            raise ConfigError(f"{where}.path", "folder source needs a directory")
        return FolderSource(train["path"], templates=train["templates"], **kw)
    if kind == "tfds":
        if not train["name"]:
            raise ConfigError(f"{where}.name", "tfds source needs a dataset name")
        return TfdsSource(train["name"], split=train["split"], data_dir=train["data_dir"],
                          image_key=train["image_key"], caption_key=train["caption_key"],
                          label_key=train["label_key"], templates=train["templates"], **kw)
    raise ConfigError(f"{where}.source", f"{kind!r} is not a readable source here")


def mixture_components(train: ConfigDict) -> list[tuple[dict, float]]:
    """data.train.mixture = ((json_of_overrides, weight), ...) -> [(section, weight)]."""
    base = {k: train[k] for k in _SOURCE_KEYS}
    out = []
    if not train.mixture:
        raise ConfigError("data.train.mixture", "mixture source needs ((json, weight), ...)")
    for i, item in enumerate(train.mixture):
        where = f"data.train.mixture[{i}]"
        try:
            spec, weight = item
            spec = json.loads(spec) if isinstance(spec, str) else dict(spec)
        except (TypeError, ValueError) as e:
            raise ConfigError(where, f"expected (json_object, weight): {e}") from None
        unknown = sorted(set(spec) - set(_SOURCE_KEYS))
        if unknown:
            raise ConfigError(where, f"unknown keys {unknown}; allowed: {list(_SOURCE_KEYS)}")
        section = {**base, **spec}
        if section["source"] in ("mixture", "synthetic"):
            raise ConfigError(where, f"a mixture component cannot be {section['source']!r}")
        if not float(weight) > 0:
            raise ConfigError(where, f"weight must be positive; got {weight!r}")
        out.append((section, float(weight)))
    return out


# --------------------------------------------------------------------------- epoch order


class EpochOrder:
    """Position in an epoch -> (shard, index in shard); reshuffled per epoch from (seed, epoch).

    Memory is O(shards + window samples): no permutation of the whole dataset is held.
    """

    def __init__(self, sizes: Sequence[int], seed: int, window: int = 0, shuffle: bool = True):
        self.sizes = np.asarray(sizes, np.int64)
        self.total = int(self.sizes.sum())
        self.seed = int(seed)
        self.window = int(window) if window and window > 0 else max(len(self.sizes), 1)
        self.shuffle = shuffle
        self._lock = threading.Lock()
        self._epochs: collections.OrderedDict = collections.OrderedDict()
        self._perms: collections.OrderedDict = collections.OrderedDict()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_lock"] = None
        state["_epochs"], state["_perms"] = collections.OrderedDict(), collections.OrderedDict()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _epoch(self, epoch: int):
        """Shard order of the epoch, grouped into windows, with cumulative offsets."""
        hit = self._epochs.get(epoch)
        if hit is not None:
            return hit
        n = len(self.sizes)
        order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                 else np.arange(n))
        windows = [order[i:i + self.window] for i in range(0, n, self.window)]
        wsizes = np.array([self.sizes[w].sum() for w in windows], np.int64)
        value = (windows, np.concatenate([[0], np.cumsum(wsizes)]))
        self._epochs[epoch] = value
        while len(self._epochs) > 2:
            self._epochs.popitem(last=False)
        return value

    def _window_perm(self, epoch: int, w: int, count: int):
        key = (epoch, w)
        hit = self._perms.get(key)
        if hit is not None:
            return hit
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch, w, 1]).permutation(count)
        else:
            perm = np.arange(count)
        self._perms[key] = perm
        while len(self._perms) > 4:
            self._perms.popitem(last=False)
        return perm

    def locate(self, position: int) -> tuple[int, int]:
        """Global stream position -> (shard, index in shard)."""
        epoch, j = divmod(int(position), self.total)
        with self._lock:
            windows, offsets = self._epoch(epoch)
            w = int(np.searchsorted(offsets, j, side="right")) - 1
            shards = windows[w]
            r = int(self._window_perm(epoch, w, int(offsets[w + 1] - offsets[w]))[j - offsets[w]])
        cum = np.cumsum(self.sizes[shards])
        k = int(np.searchsorted(cum, r, side="right"))
        start = int(cum[k - 1]) if k else 0
        return int(shards[k]), r - start


class ProcessStream(grain.MapDataset):
    """The records one process reads, in order.

    Global positions are dealt out in blocks of `block` (the local batch size): local
    index n of process p is position (k·P + p)·block + i, with k, i = divmod(n, block).
    So the i-th row of batch k of process p is row p·block + i of the global batch k of
    a single process: P processes concatenated in process order read exactly the
    batches one process would (bit for bit while no sample is skipped: a skipped sample
    is refilled from the same process's next block).

    Each record carries `_draw` = (seed, epoch, position in the epoch), the seed of all
    its random draws, and `_pos`, its global position.

    `epochs=None` is infinite (training); an integer gives a finite stream that
    covers this process's share of that many epochs.
    """

    def __init__(self, source: Source, *, seed: int, window: int = 0, process_index: int = 0,
                 process_count: int = 1, epochs: int | None = None, shuffle: bool = True,
                 block: int = 1):
        super().__init__()
        if len(source) == 0:
            raise ClipjaxError(f"{source.name} source is empty: no samples to read")
        if not 0 <= process_index < process_count:
            raise ClipjaxError(f"process_index {process_index} not in [0, {process_count})")
        self.source = source
        self.seed = int(seed)
        self.order = EpochOrder(source.sizes, seed, window, shuffle)
        self.p, self.count = process_index, process_count
        self.block = max(1, int(block))
        if epochs is None:
            self._len = sys.maxsize
        else:
            total = epochs * len(source)
            group = self.count * self.block
            full, rest = divmod(total, group)
            self._len = full * self.block + min(max(rest - self.p * self.block, 0), self.block)

    def __len__(self) -> int:
        return self._len

    def __str__(self) -> str:
        return f"ProcessStream({self.source.name}, {self.p}/{self.count}, block {self.block})"

    def position(self, index: int) -> int:
        """Local index -> global stream position."""
        k, i = divmod(int(index), self.block)
        return (k * self.count + self.p) * self.block + i

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        pos = self.position(index)
        shard, i = self.order.locate(pos)
        record = self.source.read(shard, i)
        epoch, j = divmod(pos, self.order.total)
        record["_draw"] = (self.seed, epoch, j)
        record["_pos"] = pos
        return record
