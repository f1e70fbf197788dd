"""Webdataset tar shards (img2dataset layout) with random access.

A shard holds samples as consecutive members `KEY.jpg` + `KEY.txt` (+ `KEY.json`).
Streaming readers cannot reshuffle inside a shard or resume mid-shard, so each
shard is indexed once (member offsets from the tar headers) and samples are then
read lazily with positioned reads. That gives grain the random access it needs for
deterministic order and exact resume.

Every path goes through `clipjax.paths`, so shards, `sizes.json` and the index cache
may be local, relative or remote (`gs://`, any fsspec protocol). On a bucket:

* start-up costs one LIST per shard directory (existence, size and generation of
  every shard) and one GET of `sizes.json` when it is there; without it each shard is
  indexed at start-up to count its samples;
* an index is one pass over the shard's headers (16 MiB requests); with
  `data.index_cache` set (a local or gs:// directory) the first process that needs a
  shard's index writes it there (`<sha1 of url|size|generation>.json`) and every other
  process, worker, host and restart reads it back with one small GET;
* a sample is one ranged GET of exactly the bytes of its members (they lie next to
  each other in the tar), never a readahead block.

Reusable pieces: `expand_urls` (brace patterns, '::' lists), `index_shard`,
`TarShards` (random access over many shards), `stream_shard` / `iter_shard` (one
sequential read of a whole shard).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import posixpath
import re
import tarfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from clipjax import imageio, paths, ranged_io
from clipjax.errors import ClipjaxError

log = logging.getLogger(__name__)

IMAGE_EXTS = imageio.IMAGE_SUFFIXES
TEXT_EXT = "txt"
JSON_EXT = "json"
CLS_EXT = "cls"  # webdataset's class-id member: the integer as text
SIZES_FILE = "sizes.json"  # {shard basename: sample count}; open_clip reads the same file

# --------------------------------------------------------------------------- urls

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`/d/{000..002}.tar` -> three paths; `{a,b}` alternatives; several groups multiply."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") else 0
        if int(hi) < int(lo):
            raise ClipjaxError(f"brace range {{{body}}} in {pattern!r} runs backwards")
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [p for opt in options for p in expand_braces(head + opt + tail)]


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """A brace pattern, a '::'-separated list of them, or a list/tuple -> shard paths."""
    if isinstance(urls, str):
        parts = [u.strip() for u in urls.split("::")]
    else:
        parts = [str(u).strip() for u in urls]
    out = [p for part in parts if part for p in expand_braces(part)]
    if not out:
        raise ClipjaxError("no webdataset shards given (data.train.urls is empty)")
    return out


def _dirname(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _basename(url: str) -> str:
    return url.rsplit("/", 1)[-1]


class Listing:
    """What the shard directories hold, `{name: (size, token)}` per directory: one
    listing per directory (remotely one LIST, not a request per shard). A directory
    that cannot be listed (permissions, flaky network) is probed file by file."""

    def __init__(self, urls: Sequence[str]):
        self.dirs: dict[str, dict[str, tuple[int, str]] | None] = {}
        for d in sorted({_dirname(u) for u in urls}):
            try:
                self.dirs[d] = paths.dir_identities(d)
            except Exception as e:  # noqa: BLE001 - any listing trouble: ask per file
                log.warning("cannot list %s (%s); checking shards one by one", d, e)
                self.dirs[d] = None

    def identity(self, url: str) -> tuple[int, str] | None:
        """(size, token) of a file in a listed directory; None if it does not exist."""
        names = self.dirs.get(_dirname(url))
        if names is not None:
            return names.get(_basename(url))
        try:
            return paths.identity(url)
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001 - cannot tell: let the reader find out and count it
            return (-1, "")

    def has(self, url: str) -> bool:
        return self.identity(url) is not None


def check_urls_exist(urls: Sequence[str], listing: Listing | None = None) -> Listing:
    """Fails at start-up, naming the first missing shard; returns the listing it used."""
    listing = listing or Listing(urls)
    missing = [u for u in urls if not listing.has(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ClipjaxError(f"webdataset shard not found: {missing[0]}{more}")
    return listing


# --------------------------------------------------------------------------- index


@dataclass
class Sample:
    """One sample of a shard: its key and where each member's bytes lie."""

    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # ext -> (offset, size)
    truncated: bool = False  # some member's data runs past the end of the file


def _split_name(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the basename."""
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(d, stem) if d else stem, ext.lower()


def index_tarfile(fileobj, size: int) -> tuple[list[Sample], bool]:
    """Reads only the tar headers. Returns the samples and whether the tar ended early.

    Raises tarfile.ReadError when the file is not a tar at all.
    """
    samples: list[Sample] = []
    truncated = False
    with tarfile.open(fileobj=fileobj, mode="r:") as tf:
        while True:
            try:
                m = tf.next()
            except (tarfile.ReadError, EOFError, OSError):
                truncated = True
                break
            if m is None:
                break
            tf.members = []  # tarfile keeps every TarInfo otherwise
            if not m.isfile():
                continue
            key, ext = _split_name(m.name)
            if not samples or samples[-1].key != key:
                samples.append(Sample(key))
            s = samples[-1]
            s.members[ext] = (m.offset_data, m.size)
            if m.offset_data + m.size > size:
                s.truncated = True
                truncated = True
    return samples, truncated


def _cache_path(cache_dir: str, url: str, size: int, token: str) -> str:
    """The index cache object of one version of one shard (changes when the shard does)."""
    h = hashlib.sha1(f"{url}|{size}|{token}".encode()).hexdigest()[:20]
    return f"{cache_dir.rstrip('/')}/{h}.json"


def _read_cached_index(cache: str) -> list[Sample] | None:
    try:
        raw = paths.read_bytes_or_none(cache)
        if raw is None:
            return None
        rows = json.loads(raw)
        return [Sample(k, {e: tuple(v) for e, v in m.items()}, t) for k, m, t in rows]
    except (OSError, ValueError, TypeError):
        return None  # a broken (or unreadable) cache entry is rebuilt


def index_shard(url: str, cache_dir: str = "", identity: tuple[int, str] | None = None
                ) -> list[Sample]:
    """The sample index of one shard; cached as JSON under `cache_dir` (local or remote)
    when given, so the first process that needs it builds it and every other process,
    host and restart reads it back (one small GET).

    `identity` is the shard's (size, token) when the caller listed it already.
    Raises OSError / tarfile.ReadError when the shard cannot be read.
    """
    url = paths.canonical(url)
    size, token = identity if identity and identity[0] >= 0 else paths.identity(url)
    cache = _cache_path(paths.canonical(cache_dir), url, size, token) if cache_dir else ""
    if cache:
        cached = _read_cached_index(cache)
        if cached is not None:
            return cached
    # One front-to-back pass over the headers; remotely in 16 MiB requests.
    with ranged_io.open_sequential(url, size=size) as f:
        samples, _ = index_tarfile(f, size)
    if cache:
        rows = json.dumps([[s.key, s.members, s.truncated] for s in samples]).encode()
        try:
            paths.write_bytes(cache, rows)  # whole or not at all: racing writers agree
        except Exception as e:  # noqa: BLE001 - a read-only cache still reads shards
            log.warning("cannot write the shard index cache %s: %s", cache, e)
    return samples


def known_sizes(urls: Sequence[str], listing: Listing | None = None) -> dict[str, int]:
    """Sample counts that writers recorded: `sizes.json` next to the shards (one small
    read per directory, none when the listing shows no such file). Missing -> absent."""
    out: dict[str, int] = {}
    by_dir = collections.defaultdict(list)
    for u in urls:
        by_dir[_dirname(u)].append(u)
    for d, members in by_dir.items():
        name = f"{d}/{SIZES_FILE}"
        if listing is not None and not listing.has(name):
            continue
        raw = _read_small(name)
        table = {}
        if raw is not None:
            try:
                table = {str(k): int(v) for k, v in json.loads(raw).items()}
            except (ValueError, TypeError, AttributeError):
                log.warning("%s is not a {shard: count} table; ignoring it", name)
        for u in members:
            base = _basename(u)
            if base in table:
                out[u] = table[base]
    return out


def _read_small(url: str) -> bytes | None:
    try:
        return paths.read_bytes_or_none(url)
    except (OSError, ClipjaxError):
        return None


def shard_sizes(urls: Sequence[str], cache_dir: str = "", listing: Listing | None = None
                ) -> tuple[list[int], dict[str, int]]:
    """Per-shard sample counts, plus start-up skips (unreadable shards count as 1 each).

    From `sizes.json`, else img2dataset's `NNNNN_stats.json` ("successes"), else by
    indexing the shard (cached under `cache_dir`).
    """
    recorded = known_sizes(urls, listing)
    sizes, skipped = [], {}
    for u in urls:
        if u in recorded:
            sizes.append(recorded[u])
            continue
        stats_url = re.sub(r"\.tar$", "_stats.json", u) if u.endswith(".tar") else ""
        stats = None
        if stats_url and (listing is None or listing.has(stats_url)):
            stats = _read_small(stats_url)
        if stats is not None:
            try:
                sizes.append(int(json.loads(stats)["successes"]))
                continue
            except (ValueError, KeyError, TypeError):
                pass
        try:
            ident = listing.identity(u) if listing is not None else None
            sizes.append(len(index_shard(u, cache_dir, ident)))
        except (OSError, tarfile.TarError, EOFError) as e:
            log.warning("skipping unreadable shard %s: %s", u, e)
            skipped["unreadable_shard"] = skipped.get("unreadable_shard", 0) + 1
            sizes.append(0)
    return sizes, skipped


# --------------------------------------------------------------------------- reading


_WANTED = (*IMAGE_EXTS, TEXT_EXT, JSON_EXT, CLS_EXT)


class _Reader:
    """An open shard: its index and positioned reads (`ranged_io.RangeReader`: os.pread
    locally, one ranged GET per read remotely)."""

    def __init__(self, url: str, cache_dir: str, identity: tuple[int, str] | None = None):
        self.url = url
        if identity is None or identity[0] < 0:
            identity = paths.identity(url)
        self.size = identity[0]
        self.samples = index_shard(url, cache_dir, identity)
        self._ranges = ranged_io.open_ranges(url)

    def read_members(self, sample: Sample) -> tuple[dict[str, bytes], bool]:
        """The wanted members of one sample with ONE read: tar keeps a sample's members
        next to each other, so the span from the first to the last is read whole and cut.
        Returns (members, truncated)."""
        spans = {e: m for e, m in sample.members.items() if e in _WANTED}
        if not spans:
            return {}, sample.truncated
        lo = min(off for off, _ in spans.values())
        hi = min(max(off + n for off, n in spans.values()), self.size)
        data = self._ranges.read(lo, hi - lo) if hi > lo else b""
        members, truncated = {}, sample.truncated
        for ext, (off, n) in spans.items():
            part = data[off - lo:off - lo + n]
            if len(part) != n:
                truncated = True
            members[ext] = part
        return members, truncated

    def close(self) -> None:
        self._ranges.close()


def record_from_members(key: str, members: dict[str, bytes | None], truncated: bool = False,
                        error: str | None = None) -> dict:
    """A raw record: the image bytes, caption bytes and json bytes of one sample."""
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    return {
        "key": key,
        "image": image,
        "text": members.get(TEXT_EXT),
        "json": members.get(JSON_EXT),
        "cls": members.get(CLS_EXT),
        "error": error or ("truncated_member" if truncated else None),
    }


def sample_label(record: dict) -> int | None:
    """A sample's class id: its `.cls` member, else the "label" of its `.json`; None when
    it has neither (or they do not hold an integer)."""
    try:
        if record.get("cls") is not None:
            return int(record["cls"].decode("utf-8").strip())
        if record.get("json") is not None:
            label = json.loads(record["json"]).get("label")
            if isinstance(label, int | str) and not isinstance(label, bool):
                return int(label)
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return None


class TarShards:
    """Random access to samples of many shards: `read(shard, i)` -> raw record dict.

    Picklable (grain sends it to worker processes); open shards live in a small
    per-process LRU, so workers open what they touch.
    """

    def __init__(self, urls: Sequence[str], sizes: Sequence[int], *, cache_dir: str = "",
                 max_open: int = 32,
                 identities: Sequence[tuple[int, str] | None] | None = None):
        self.urls = [paths.canonical(u) for u in urls]
        self.sizes = [int(n) for n in sizes]
        self.cache_dir = paths.canonical(cache_dir) if cache_dir else ""
        self.max_open = max_open
        # (size, token) per shard from the start-up listing: opening a shard then costs
        # no metadata request (the index cache key needs both).
        self.identities = list(identities) if identities is not None else [None] * len(urls)
        self._init_cache()

    def _init_cache(self):
        self._open: collections.OrderedDict[int, _Reader | Exception] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_open"], state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_cache()

    def _reader(self, shard: int) -> _Reader | Exception:
        with self._lock:
            r = self._open.get(shard)
            if r is not None:
                self._open.move_to_end(shard)
                return r
            try:
                r = _Reader(self.urls[shard], self.cache_dir, self.identities[shard])
            except Exception as e:  # noqa: BLE001 - OSError, TarError, a remote client's own

                log.warning("unreadable shard %s: %s", self.urls[shard], e)
                r = e
            self._open[shard] = r
            while len(self._open) > self.max_open:
                _, old = self._open.popitem(last=False)
                if isinstance(old, _Reader):
                    old.close()
            return r

    def read(self, shard: int, i: int) -> dict:
        url = self.urls[shard]
        r = self._reader(shard)
        if isinstance(r, Exception):
            return record_from_members(f"{url}:#{i}", {}, error="unreadable_shard")
        if i >= len(r.samples):  # the recorded count exceeds what the tar holds
            return record_from_members(f"{url}:#{i}", {}, error="truncated_shard")
        s = r.samples[i]
        try:
            members, truncated = r.read_members(s)
        except Exception:  # noqa: BLE001 - I/O (the remote client retried already): skipped
            return record_from_members(f"{url}:{s.key}", {}, error="read_error")
        return record_from_members(f"{url}:{s.key}", members, truncated)

    def close(self) -> None:
        with self._lock:
            for r in self._open.values():
                if isinstance(r, _Reader):
                    r.close()
            self._open.clear()


def stream_shard(url: str, wanted: Sequence[str] | None = _WANTED
                 ) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """(key, {ext: bytes}, error) of every sample of one shard in file order, from ONE
    front-to-back read (one stream from a bucket, no index): for readers that take a
    shard whole — evaluation, converters, curation. `wanted` keeps those members (None:
    every member). An unreadable shard yields one ('', {}, 'unreadable_shard'); a member
    cut short by the end of the file gives its sample 'truncated_member' and ends the shard.
    """
    f = None
    try:
        f = ranged_io.open_sequential(url)
        tar = tarfile.open(fileobj=f, mode="r|*")
    except Exception:  # noqa: BLE001 - missing, unreadable, not a tar: one error record
        if f is not None:
            f.close()
        yield "", {}, "unreadable_shard"
        return
    key, members = None, {}
    try:
        while True:
            try:
                m = tar.next()
            except (tarfile.TarError, EOFError, OSError):
                break  # the tar ends early: what came before stands
            if m is None:
                break
            if not m.isfile():
                continue
            k, ext = _split_name(m.name)
            if k != key and key is not None:
                yield key, members, None
                members = {}
            key = k
            if wanted is not None and ext not in wanted:
                continue
            try:
                members[ext] = tar.extractfile(m).read()
            except (tarfile.TarError, EOFError, OSError):
                yield key, members, "truncated_member"
                key = None
                break
        if key is not None:
            yield key, members, None
    finally:
        tar.close()
        f.close()


def iter_shard(url: str) -> Iterator[dict]:
    """Every sample of one shard in file order, as raw records (keys `URL:KEY`)."""
    url = paths.canonical(url)
    for key, members, error in stream_shard(url):
        yield record_from_members(f"{url}:{key}", members, error=error)


iter_shard_members = stream_shard  # the members themselves, for tools that copy samples


def iter_urls(urls: Sequence[str]) -> Iterator[dict]:
    return itertools.chain.from_iterable(iter_shard(u) for u in urls)
