"""Writing img2dataset-layout webdataset shards from folders, TFDS datasets and IDX files.

Each shard `NNNNN.tar` holds `KEY.jpg|png|webp` + `KEY.txt` + `KEY.json` per
sample, keys are 9-digit running numbers as img2dataset writes them, and
`sizes.json` records every shard's sample count (open_clip reads the same file).
Images already in JPEG/PNG/WebP are copied as they are; others are re-encoded.
Samples that fail to decode are skipped and counted, as the pipeline would.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from collections.abc import Iterable

import numpy as np

from clipjax import paths
from clipjax.data import decode
from clipjax.data import sources as sources_lib
from clipjax.data.webdataset import SIZES_FILE
from clipjax.errors import ClipjaxError

_PASSTHROUGH = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class ShardWriter:
    """Appends samples to `out_dir/NNNNN.tar`, `shard_size` per shard; `close()` writes sizes."""

    def __init__(self, out_dir: str, shard_size: int, *, image_format: str = "jpg",
                 quality: int = 95):
        if shard_size <= 0:
            raise ClipjaxError(f"--shard-size must be positive; got {shard_size}")
        if image_format not in ("jpg", "png"):
            raise ClipjaxError(f"image format must be jpg or png; got {image_format!r}")
        out_dir = paths.canonical(out_dir)  # local, relative or a bucket (gs://)
        paths.makedirs(out_dir)
        self.out_dir, self.shard_size = out_dir.rstrip("/"), int(shard_size)
        self.image_format, self.quality = image_format, int(quality)
        self.sizes: dict[str, int] = {}
        self.count = 0
        self._tar: tarfile.TarFile | None = None
        self._writer = None  # the atomic_writer context of the open shard
        self._name = ""

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o444, 0
        self._tar.addfile(info, io.BytesIO(data))

    def _roll(self) -> None:
        if self._tar is not None and self.sizes[self._name] < self.shard_size:
            return
        self._finish_shard()
        self._name = f"{len(self.sizes):05d}.tar"
        # The shard appears whole when finished (tmp + rename locally, one object on a
        # bucket), so a crashed conversion never leaves a half shard under its name.
        self._writer = paths.atomic_writer(f"{self.out_dir}/{self._name}")
        self._tar = tarfile.open(fileobj=self._writer.__enter__(), mode="w",
                                 format=tarfile.USTAR_FORMAT)
        self.sizes[self._name] = 0

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()  # writes the end-of-archive blocks; leaves the file open
        writer, self._writer, self._tar = self._writer, None, None
        writer.__exit__(None, None, None)

    def abort(self) -> None:
        """Drops the shard being written (nothing appears under its name)."""
        if self._tar is None:
            return
        writer, self._writer, self._tar = self._writer, None, None
        error = ClipjaxError("conversion aborted")
        with contextlib.suppress(ClipjaxError):
            writer.__exit__(ClipjaxError, error, None)  # removes the tmp / discards the upload

    def encode(self, image) -> tuple[bytes, str]:
        """(bytes, ext): encoded originals pass through; arrays and other formats are encoded."""
        if isinstance(image, bytes | bytearray):
            pil = decode.open_image(bytes(image), 0)
            ext = _PASSTHROUGH.get(pil.format or "")
            pil = decode.load_rgb(pil)  # decodes fully: a corrupt image is not written
            if ext is not None:
                return bytes(image), ext
        else:
            pil = decode.array_image(np.asarray(image))
        buf = io.BytesIO()
        if self.image_format == "jpg":
            pil.save(buf, "JPEG", quality=self.quality)
        else:
            pil.save(buf, "PNG")
        return buf.getvalue(), self.image_format

    def write(self, image, caption: str, meta: dict | None = None) -> str:
        """Adds one sample; raises decode.BadSample when the image is unusable."""
        data, ext = self.encode(image)
        self._roll()
        key = f"{self.count:09d}"
        self._member(f"{key}.{ext}", data)
        self._member(f"{key}.txt", caption.encode("utf-8"))
        meta = {"key": key, "caption": caption, **(meta or {})}
        self._member(f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        self.sizes[self._name] += 1
        self.count += 1
        return key

    def write_members(self, key: str, members: dict[str, bytes]) -> None:
        """Copies one sample's members (`{ext: bytes}`) under its own key, bytes untouched
        (for tools that select samples of existing shards, e.g. `clipjax data filter`)."""
        self._roll()
        for ext, data in members.items():
            self._member(f"{key}.{ext}", data)
        self.sizes[self._name] += 1
        self.count += 1

    def close(self) -> list[str]:
        self._finish_shard()
        paths.write_bytes(f"{self.out_dir}/{SIZES_FILE}",
                             json.dumps(self.sizes, indent=1).encode("utf-8"))
        return [f"{self.out_dir}/{n}" for n in self.sizes]


def source_for(kind: str, inp: str, *, split: str = "train", data_dir: str = "",
               templates=(), classnames=(), image_key: str = "image",
               caption_key: str = "caption", label_key: str = "label") -> sources_lib.Source:
    """The random-access source a converter reads (folder path, tfds name, or IDX dir)."""
    if kind == "folder":
        return sources_lib.FolderSource(inp, templates=templates)
    if kind == "tfds":
        return sources_lib.TfdsSource(inp, split=split, data_dir=data_dir, image_key=image_key,
                                      caption_key=caption_key, label_key=label_key,
                                      templates=templates)
    if kind == "idx":
        return sources_lib.IdxSource(inp, split=split, classnames=classnames,
                                     templates=templates)
    raise ClipjaxError(f"cannot convert from {kind!r}; choose folder, tfds or idx")


def _captions_of(record: dict, rng: np.random.Generator) -> str:
    cands = decode.caption_candidates(record["text"])
    if "label" in record:  # class captions: one template per image, seeded
        return decode.pick_caption(cands, "random", rng)
    return "\n".join(cands)  # several real captions: one per line


def convert(records: Iterable[dict], writer: ShardWriter, *, seed: int = 0,
            limit: int = 0, max_pixels: int = 0, classnames=()) -> dict:
    """Writes records through `writer`; returns {"samples", "skipped", "shards"}."""
    rng = np.random.default_rng(seed)
    skipped: dict[str, int] = {}
    try:
        _write_all(records, writer, rng, skipped, limit, max_pixels, classnames)
    except BaseException:
        writer.abort()
        raise
    shards = writer.close()
    return {"samples": writer.count, "skipped": skipped, "shards": len(shards)}


def _write_all(records, writer, rng, skipped, limit, max_pixels, classnames) -> None:
    for rec in records:
        if limit and writer.count >= limit:
            break
        try:
            if rec.get("error"):
                raise decode.BadSample(rec["error"])
            caption = _captions_of(rec, rng)
            image = rec["image"]
            if isinstance(image, bytes) and max_pixels:
                decode.open_image(image, max_pixels)
            meta = {"source_key": rec["key"]}
            if "label" in rec:
                meta["label"] = rec["label"]
                if classnames:
                    meta["classname"] = classnames[rec["label"]]
            writer.write(image, caption, meta)
        except decode.BadSample as e:
            skipped[e.reason] = skipped.get(e.reason, 0) + 1


def convert_source(kind: str, inp: str, out_dir: str, shard_size: int, *, seed: int = 0,
                   limit: int = 0, image_format: str = "jpg", max_pixels: int = 0,
                   **source_kw) -> dict:
    src = source_for(kind, inp, **source_kw)
    writer = ShardWriter(out_dir, shard_size, image_format=image_format)
    names = list(getattr(src, "classnames", []) or [])
    report = convert(src.records(), writer, seed=seed, limit=limit, max_pixels=max_pixels,
                     classnames=names)
    if report["samples"] == 0:
        raise ClipjaxError(f"{inp}: no sample could be converted ({report['skipped']})")
    report["out"] = writer.out_dir
    return report

