"""The one path layer: every path a user gives (workdir, checkpoint, shards, caches,
indexes, outputs) goes through here, so `gs://` (or any fsspec protocol whose package
is installed) behaves like a local path, and a relative local path means the same
thing wherever the process later looks from.

Paths are `etils.epath.Path` objects. A relative local path is made absolute when it
is resolved (orbax insists on absolute paths, and a run must not move if the process
changes directory); `file://` is stripped; URIs are kept as they are. A protocol
whose filesystem package is missing is a `ClipjaxError` that says what to install,
not an ImportError from deep inside a save.

Object stores have no rename and no append: `write_text` replaces an object whole
(atomic on GCS, tmp + rename locally), and nothing here appends to a remote file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
from collections.abc import Iterator
from typing import IO, Any

from etils import epath

from clipjax.errors import ClipjaxError

PathLike = str | os.PathLike

_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# protocol -> (module to import, pip requirement that provides it)
_BACKENDS = {
    "gs": ("gcsfs", "clipjax[gcs]  (or: pip install gcsfs)"),
    "gcs": ("gcsfs", "clipjax[gcs]  (or: pip install gcsfs)"),
    "s3": ("s3fs", "s3fs"),
    "az": ("adlfs", "adlfs"),
    "abfs": ("adlfs", "adlfs"),
    "hf": ("huggingface_hub", "huggingface_hub"),
}


class _DropBucketTypeNoise(logging.Filter):
    """gcsfs warns on every call that it cannot tell a bucket's type without default
    credentials (always so against an emulator); the fallback it takes is the right one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Could not determine bucket type" not in record.getMessage()


logging.getLogger("gcsfs").addFilter(_DropBucketTypeNoise())


def _no_listing_caches() -> None:
    """Other processes write the same bucket (the trainer, the evaluator following it,
    other hosts): a directory listing cached by gcsfs would hide their writes forever.
    fsspec applies `fsspec.config.conf[protocol]` to every filesystem it creates."""
    with contextlib.suppress(ImportError):
        import fsspec.config

        for proto in ("gs", "gcs"):
            fsspec.config.conf.setdefault(proto, {}).setdefault("use_listings_cache", False)


_no_listing_caches()


def protocol(path: PathLike) -> str:
    """'gs', 's3', ... for a URI; '' for a local path (including file://)."""
    m = _URI.match(os.fspath(path))
    if not m or m.group(1).lower() == "file":
        return ""
    return m.group(1).lower()


def is_remote(path: PathLike) -> bool:
    return protocol(path) != ""


def require_backend(path: PathLike) -> None:
    """A ClipjaxError naming the package to install when `path`'s protocol lacks one."""
    proto = protocol(path)
    if not proto:
        return
    module, requirement = _BACKENDS.get(proto, (None, None))
    if module is None:
        if importlib.util.find_spec("fsspec") is None:
            raise ClipjaxError(f"{path}: {proto}:// paths need fsspec: pip install fsspec")
        import fsspec

        try:
            fsspec.get_filesystem_class(proto)
        except (ImportError, ValueError) as e:
            raise ClipjaxError(f"{path}: no filesystem for {proto}:// ({e})") from e
        return
    if importlib.util.find_spec(module) is None:
        raise ClipjaxError(f"{path}: {proto}:// paths need the {module} package: "
                           f"pip install {requirement}")


def resolve(path: PathLike) -> epath.Path:
    """A user's path as an absolute `epath.Path` (see the module docstring)."""
    if isinstance(path, epath.Path) and is_remote(os.fspath(path)):
        return path
    s = os.fspath(path)
    if not s:
        raise ClipjaxError("an empty path was given")
    if is_remote(s):
        require_backend(s)
        return epath.Path(s)
    if s.startswith("file://"):
        s = s[len("file://"):]
    return epath.Path(os.path.abspath(os.path.expanduser(s)))


def to_str(path: PathLike) -> str:
    """The resolved path as a string (for libraries that want one: orbax, tensorstore)."""
    return os.fspath(resolve(path))


def join(path: PathLike, *parts: str) -> epath.Path:
    out = resolve(path)
    for p in parts:
        out = out / p
    return out


def local(path: PathLike) -> str | None:
    """The local filesystem path, or None for a remote one."""
    return None if is_remote(path) else to_str(path)


def exists(path: PathLike) -> bool:
    return resolve(path).exists()


def is_dir(path: PathLike) -> bool:
    return resolve(path).is_dir()


def is_file(path: PathLike) -> bool:
    return resolve(path).is_file()


def listdir(path: PathLike) -> list[str]:
    """Names in a directory (fresh: a remote listing is never served from a cache)."""
    p = resolve(path)
    invalidate_cache(p)
    if not p.is_dir():
        return []
    return sorted(c.name for c in p.iterdir())


def makedirs(path: PathLike) -> None:
    """Creates a local directory (and its parents); object stores need none."""
    s = canonical(path)
    if not is_remote(s):
        os.makedirs(s, exist_ok=True)


def writable_dir(path: PathLike, what: str = "--workdir") -> None:
    """Creates a local directory to write in, or says in one line why it cannot be one
    (a file is in the way, no permission, a read-only disk). Remote paths pass: a bucket
    answers only when written to."""
    from clipjax.errors import ClipjaxError

    s = canonical(path)
    if is_remote(s):
        return
    if os.path.exists(s) and not os.path.isdir(s):
        raise ClipjaxError(f"{what} {s}: is a file, not a directory")
    try:
        os.makedirs(s, exist_ok=True)
    except OSError as e:
        where = f" ({e.filename})" if e.filename and e.filename != s else ""
        raise ClipjaxError(f"{what} {s}: cannot create it: {e.strerror}{where}") from None
    probe = os.path.join(s, f".clipjax-write-test.{os.getpid()}")
    try:  # a real write: permission bits, ACLs, read-only mounts, and root all answer alike
        with _builtin_open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ClipjaxError(f"{what} {s}: cannot write in it: {e.strerror}") from None


def read_bytes(path: PathLike) -> bytes:
    return resolve(path).read_bytes()


def read_text(path: PathLike) -> str:
    return resolve(path).read_text(encoding="utf-8")


def write_bytes(path: PathLike, data: bytes) -> None:
    """Replaces the file whole: readers see the old content or the new, never a part."""
    with atomic_writer(path) as f:
        f.write(data)


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def open(path: PathLike, mode: str = "rb") -> IO[Any]:  # noqa: A001 (the module's own open)
    """A file object; remote ones are fsspec buffered files (seek + ranged reads)."""
    p = resolve(path)
    if "w" in mode or "a" in mode:
        p.parent.mkdir(parents=True, exist_ok=True)
    return p.open(mode)


def size(path: PathLike) -> int:
    p = resolve(path)
    if is_remote(p):
        fs, key = fsspec_fs(p)
        return int(fs.size(key))
    return os.path.getsize(os.fspath(p))


def mtime_token(path: PathLike) -> str:
    """Something that changes when the file changes (mtime locally; generation/etag
    remotely), for caches keyed by a file's identity."""
    return identity(path)[1]


def fsspec_fs(path: PathLike):
    """(fsspec filesystem, path within it) for a path of any protocol, for streaming,
    ranged reads and listings."""
    import fsspec

    s = canonical(path)
    try:
        return fsspec.core.url_to_fs(s)
    except (ImportError, ValueError) as e:
        raise ClipjaxError(f"{s}: cannot open this URL scheme: {e}") from e


def invalidate_cache(path: PathLike) -> None:
    """Drops fsspec's listing cache for `path`, so a listing sees other processes' writes."""
    if not is_remote(path):
        return
    with contextlib.suppress(Exception):
        fs, key = fsspec_fs(path)
        fs.invalidate_cache(key)


def glob(pattern: PathLike) -> list[str]:
    """Paths matching a glob pattern, as strings, sorted (remote: with the protocol)."""
    s = to_str(pattern)
    if not is_remote(s):
        import glob as glob_lib

        return sorted(glob_lib.glob(s))
    fs, key = fsspec_fs(s)
    proto = protocol(s)
    return sorted(f"{proto}://{m}" if "://" not in m else m for m in fs.glob(key))


def rmtree(path: PathLike) -> None:
    p = resolve(path)
    if p.exists():
        p.rmtree()


def walk_files(path: PathLike) -> Iterator[epath.Path]:
    """Every file under a directory, depth first, names sorted."""
    root = resolve(path)
    for child in sorted(root.iterdir(), key=lambda c: c.name):
        if child.is_dir():
            yield from walk_files(child)
        else:
            yield child


# --------------------------------------------------------------------------- data readers
# (added for clipjax.data: ranged reads of shards, one-pass reads, listings, atomic writes)


def canonical(path: PathLike) -> str:
    """`to_str` without building an `epath.Path`, so any fsspec protocol whose package is
    installed works (memory://, s3://, ...): remote URIs as given, local paths absolute."""
    s = os.fspath(path)
    if not s:
        raise ClipjaxError("an empty path was given")
    if is_remote(s):
        require_backend(s)
        return s
    if s.startswith("file://"):
        s = s[len("file://"):]
    return os.path.abspath(os.path.expanduser(s))


def _token(info: dict) -> str:
    for k in ("generation", "etag", "ETag", "mtime", "LastModified", "updated"):
        if info.get(k):
            return str(info[k])
    return ""


def identity(path: PathLike) -> tuple[int, str]:
    """(size, mtime_token) of a file with one stat (one metadata request remotely)."""
    s = canonical(path)
    if not is_remote(s):
        st = os.stat(s)
        return int(st.st_size), str(st.st_mtime_ns)
    fs, key = fsspec_fs(s)
    info = fs.info(key)
    return int(info["size"]), _token(info)


def dir_identities(path: PathLike) -> dict[str, tuple[int, str]]:
    """{name: (size, mtime_token)} of the files directly in a directory: one listing
    (remotely one paginated LIST, never served from fsspec's cache). Missing -> {}."""
    s = canonical(path)
    if not is_remote(s):
        out = {}
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            with os.scandir(s) as it:
                for e in it:
                    if e.is_file():
                        st = e.stat()
                        out[e.name] = (int(st.st_size), str(st.st_mtime_ns))
        return out
    invalidate_cache(s)
    fs, key = fsspec_fs(s)
    try:
        entries = fs.ls(key, detail=True)
    except FileNotFoundError:
        return {}
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: (int(e.get("size") or 0), _token(e))
            for e in entries if e.get("type") == "file"}


def list_files(path: PathLike) -> list[str]:
    """Every file under a directory (recursive; local symlinks followed), as sorted
    '/'-separated paths relative to it; remotely one listing of the whole prefix."""
    s = canonical(path)
    if not is_remote(s):
        root = s
        out = []
        for d, dirs, files in os.walk(root, followlinks=True):
            dirs.sort()
            rel = os.path.relpath(d, root)
            for f in files:
                out.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
        return sorted(out)
    invalidate_cache(s)
    fs, key = fsspec_fs(s)
    base = key.rstrip("/") + "/"
    return sorted(k[len(base):] for k in fs.find(key) if k.startswith(base))


def read_bytes_or_none(path: PathLike) -> bytes | None:
    """The file's bytes, or None if it does not exist (remotely a single GET: no
    existence check first)."""
    s = canonical(path)
    try:
        if not is_remote(s):
            with _builtin_open(s, "rb") as f:
                return f.read()
        fs, key = fsspec_fs(s)
        return fs.cat_file(key)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _builtin_open(path: str, mode: str = "rb", **kw) -> IO[Any]:
    import builtins

    return builtins.open(path, mode, **kw)


@contextlib.contextmanager
def atomic_writer(path: PathLike) -> Iterator[IO[bytes]]:
    """A binary file whose content appears at `path` whole, when the block ends without an
    error (locally tmp + rename; remotely one object committed on close, discarded on
    error). For outputs too big for `write_bytes` (tar shards)."""
    s = canonical(path)
    if not is_remote(s):
        d, name = os.path.split(s)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".{name}.{os.getpid()}.tmp")
        try:
            with _builtin_open(tmp, "wb") as f:
                yield f
            os.replace(tmp, s)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return
    fs, key = fsspec_fs(s)
    f = fs.open(key, "wb")
    try:
        yield f
    except BaseException:
        with contextlib.suppress(Exception):
            f.discard()
        raise
    f.close()
    invalidate_cache(s.rsplit("/", 1)[0])
