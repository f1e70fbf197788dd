"""Webdataset tar shards (img2dataset layout) with random access.

A shard holds samples as consecutive members `KEY.jpg` + `KEY.txt` (+ `KEY.json`).
Streaming readers cannot reshuffle inside a shard or resume mid-shard, so each
shard is indexed once (member offsets from the tar headers, optionally cached on
disk) and samples are then read lazily with positioned reads. That gives grain
the random access it needs for deterministic order and exact resume.

Reusable pieces: `expand_urls` (brace patterns, '::' lists), `index_shard`,
`TarShards` (random access over many shards), `iter_shard` (sequential reading).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import os
import re
import tarfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from clipjax.errors import ClipjaxError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXT = "txt"
JSON_EXT = "json"
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


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _local(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _fs(url: str):
    try:
        import fsspec
    except ImportError as e:  # pragma: no cover - fsspec ships with the dependencies
        raise ClipjaxError(f"{url}: remote paths need fsspec") from e
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise ClipjaxError(f"{url}: cannot open this URL scheme: {e}") from e
    return fs, path


def url_exists(url: str) -> bool:
    if not is_remote(url):
        return os.path.isfile(_local(url))
    fs, path = _fs(url)
    try:
        return bool(fs.isfile(path))
    except Exception:  # network or permission trouble: let the reader count it
        return True


def file_size(url: str) -> int:
    if not is_remote(url):
        return os.path.getsize(_local(url))
    fs, path = _fs(url)
    return int(fs.size(path))


def _read_small(url: str) -> bytes | None:
    try:
        if not is_remote(url):
            with open(_local(url), "rb") as f:
                return f.read()
        fs, path = _fs(url)
        with fs.open(path, "rb") as f:
            return f.read()
    except (OSError, ClipjaxError):
        return None


def _remote_listing(urls: Sequence[str]) -> set[str]:
    """Existing remote shards, one listing per directory instead of one request per shard."""
    found: set[str] = set()
    by_dir = collections.defaultdict(list)
    for u in urls:
        by_dir[u.rsplit("/", 1)[0]].append(u)
    for d, members in by_dir.items():
        fs, path = _fs(d)
        try:
            names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
        except FileNotFoundError:
            continue
        except Exception:  # cannot list (permissions, flaky network): ask per shard
            found.update(u for u in members if url_exists(u))
            continue
        found.update(u for u in members if u.rsplit("/", 1)[-1] in names)
    return found


def check_urls_exist(urls: Sequence[str]) -> None:
    """Fails at start-up, naming the first missing shard."""
    remote = _remote_listing([u for u in urls if is_remote(u)])
    missing = [u for u in urls if (u not in remote if is_remote(u) else not url_exists(u))]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ClipjaxError(f"webdataset shard not found: {missing[0]}{more}")


# --------------------------------------------------------------------------- index


@dataclass
class Sample:
    """One sample of a shard: its key and where each member's bytes lie."""

    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # ext -> (offset, size)
    truncated: bool = False  # some member's data runs past the end of the file


def _split_name(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the basename."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(d, stem) if d else stem, ext.lower()


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


def _cache_path(cache_dir: str, url: str, size: int, mtime: int) -> str:
    h = hashlib.sha1(f"{url}|{size}|{mtime}".encode()).hexdigest()[:20]
    return os.path.join(cache_dir, f"{h}.json")


def _mtime(url: str) -> int:
    if is_remote(url):
        return 0
    return os.stat(_local(url)).st_mtime_ns


def index_shard(url: str, cache_dir: str = "") -> list[Sample]:
    """The sample index of one shard; cached as JSON under `cache_dir` when given.

    Raises OSError / tarfile.ReadError when the shard cannot be read.
    """
    size = file_size(url)
    cache = _cache_path(cache_dir, url, size, _mtime(url)) if cache_dir else ""
    if cache and os.path.exists(cache):
        try:
            with open(cache, encoding="utf-8") as f:
                rows = json.load(f)
            return [Sample(k, {e: tuple(v) for e, v in m.items()}, t) for k, m, t in rows]
        except (OSError, ValueError, TypeError):
            pass  # a broken cache entry is rebuilt
    if is_remote(url):
        fs, path = _fs(url)
        with fs.open(path, "rb") as f:
            samples, _ = index_tarfile(f, size)
    else:
        with open(_local(url), "rb") as f:
            samples, _ = index_tarfile(f, size)
    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump([[s.key, s.members, s.truncated] for s in samples], f)
        os.replace(tmp, cache)
    return samples


def known_sizes(urls: Sequence[str]) -> dict[str, int]:
    """Sample counts that writers recorded: `sizes.json` next to the shards, or
    img2dataset's `NNNNN_stats.json` ("successes"). Missing entries are absent."""
    out: dict[str, int] = {}
    by_dir = collections.defaultdict(list)
    for u in urls:
        by_dir[u.rsplit("/", 1)[0] if "/" in u else "."].append(u)
    for d, members in by_dir.items():
        raw = _read_small(f"{d}/{SIZES_FILE}")
        table = {}
        if raw is not None:
            try:
                table = {str(k): int(v) for k, v in json.loads(raw).items()}
            except (ValueError, TypeError, AttributeError):
                log.warning("%s/%s is not a {shard: count} table; ignoring it", d, SIZES_FILE)
        for u in members:
            base = u.rsplit("/", 1)[-1]
            if base in table:
                out[u] = table[base]
    return out


def shard_sizes(urls: Sequence[str], cache_dir: str = "") -> tuple[list[int], dict[str, int]]:
    """Per-shard sample counts, plus start-up skips (unreadable shards count as 1 each)."""
    recorded = known_sizes(urls)
    sizes, skipped = [], {}
    for u in urls:
        if u in recorded:
            sizes.append(recorded[u])
            continue
        stats = _read_small(re.sub(r"\.tar$", "_stats.json", u)) if u.endswith(".tar") else None
        if stats is not None:
            try:
                sizes.append(int(json.loads(stats)["successes"]))
                continue
            except (ValueError, KeyError, TypeError):
                pass
        try:
            sizes.append(len(index_shard(u, cache_dir)))
        except (OSError, tarfile.TarError, EOFError) as e:
            log.warning("skipping unreadable shard %s: %s", u, e)
            skipped["unreadable_shard"] = skipped.get("unreadable_shard", 0) + 1
            sizes.append(0)
    return sizes, skipped


# --------------------------------------------------------------------------- reading


class _Reader:
    """An open shard: its index and positioned reads (os.pread locally: thread-safe)."""

    def __init__(self, url: str, cache_dir: str):
        self.url = url
        self.samples = index_shard(url, cache_dir)
        self.size = file_size(url)
        self._lock = threading.Lock()
        if is_remote(url):
            fs, path = _fs(url)
            self._file = fs.open(path, "rb")
            self._fd = None
        else:
            self._fd = os.open(_local(url), os.O_RDONLY)
            self._file = None

    def read(self, offset: int, size: int) -> bytes:
        if self._fd is not None:
            return os.pread(self._fd, size, offset)
        with self._lock:
            self._file.seek(offset)
            return self._file.read(size)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._file is not None:
            self._file.close()
            self._file = None


def record_from_members(key: str, members: dict[str, bytes | None], truncated: bool = False,
                        error: str | None = None) -> dict:
    """A raw record: the image bytes, caption bytes and json bytes of one sample."""
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    return {
        "key": key,
        "image": image,
        "text": members.get(TEXT_EXT),
        "json": members.get(JSON_EXT),
        "error": error or ("truncated_member" if truncated else None),
    }


class TarShards:
    """Random access to samples of many shards: `read(shard, i)` -> raw record dict.

    Picklable (grain sends it to worker processes); open shards live in a small
    per-process LRU, so workers open what they touch.
    """

    def __init__(self, urls: Sequence[str], sizes: Sequence[int], *, cache_dir: str = "",
                 max_open: int = 32):
        self.urls = list(urls)
        self.sizes = [int(n) for n in sizes]
        self.cache_dir = cache_dir
        self.max_open = max_open
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
                r = _Reader(self.urls[shard], self.cache_dir)
            except (OSError, tarfile.TarError, EOFError, ClipjaxError) as e:
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
        members = {}
        truncated = s.truncated
        try:
            for ext, (off, size) in s.members.items():
                if ext in IMAGE_EXTS or ext in (TEXT_EXT, JSON_EXT):
                    data = r.read(off, size)
                    if len(data) != size:
                        truncated = True
                    members[ext] = data
        except OSError:
            return record_from_members(f"{url}:{s.key}", {}, error="read_error")
        return record_from_members(f"{url}:{s.key}", members, truncated)

    def close(self) -> None:
        with self._lock:
            for r in self._open.values():
                if isinstance(r, _Reader):
                    r.close()
            self._open.clear()


def iter_shard(url: str) -> Iterator[dict]:
    """Every sample of one shard in file order, as raw records (for checks and converters).

    An unreadable shard yields one record with error 'unreadable_shard'.
    """
    shards = TarShards([url], [0])
    r = shards._reader(0)
    if isinstance(r, Exception):
        yield record_from_members(f"{url}:", {}, error="unreadable_shard")
        return
    try:
        for i in range(len(r.samples)):
            yield shards.read(0, i)
    finally:
        shards.close()


def iter_urls(urls: Sequence[str]) -> Iterator[dict]:
    return itertools.chain.from_iterable(iter_shard(u) for u in urls)
