"""`clipjax data filter`: new shards holding only the pairs the rules keep, and a report.

The kept samples' members (image, caption, json) are copied byte for byte under
their own keys into `NNNNN.tar` shards with `sizes.json` (the `data convert`
writer), so training reads the result like any other shards. `report.json`
counts what was kept and what each rule dropped; `score_histogram.png` shows the
cosines of every scored pair, the kept ones and the threshold.
"""

from __future__ import annotations

import collections
import io
import json
import time
from collections.abc import Sequence

import numpy as np

from clipjax import paths
from clipjax.curation import rules as rules_lib
from clipjax.curation import samples as samples_lib
from clipjax.curation import tables
from clipjax.data import decode
from clipjax.data import webdataset as wds
from clipjax.data.convert import ShardWriter
from clipjax.errors import ClipjaxError

REPORT = "report.json"
HISTOGRAM = "score_histogram.png"


def load_scores(scores_dir: str) -> tuple[dict[str, dict[str, float]], np.ndarray]:
    """{shard url: {key: cosine}} of every score table, and all cosines."""
    table, _ = tables.read_all(scores_dir, ["shard", "key", "cosine"])
    shard = table.column("shard").to_pylist()
    key = table.column("key").to_pylist()
    cos = table.column("cosine").to_numpy().astype(np.float32)
    by_shard: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for s, k, c in zip(shard, key, cos.tolist()):
        by_shard[s][k] = c
    return by_shard, cos


def filter_shards(scores_dir: str, urls: Sequence[str], out_dir: str, rules: rules_lib.Rules,
                  *, shard_size: int = 10000, progress=None) -> dict:
    start = time.perf_counter()
    by_shard, cosines = load_scores(scores_dir)
    cut = rules_lib.threshold(rules, cosines)
    urls = [paths.canonical(u) for u in urls]
    unknown = [u for u in urls if u not in by_shard]
    if len(unknown) == len(urls):
        raise ClipjaxError(f"none of the --shards has scores in {scores_dir} (first: "
                           f"{urls[0]}); score the same shards first")
    out_dir = paths.canonical(out_dir)
    writer = ShardWriter(out_dir, shard_size)
    dropped = dict.fromkeys(rules_lib.RULES, 0)
    bad: dict[str, int] = {}
    kept_cos, seen = [], 0
    try:
        for url in urls:
            scores = by_shard.get(url, {})
            for key, members, error in wds.iter_shard_members(url):
                seen += 1
                try:
                    if error:
                        raise decode.BadSample(error)
                    caption = samples_lib.caption_of(wds.record_from_members(key, members))
                except decode.BadSample as e:
                    dropped["bad_sample"] += 1
                    samples_lib.count(bad, e.reason)
                    continue
                cos = scores.get(key)
                why = rules_lib.verdict(rules, cut, url, key, caption, cos)
                if why is None:
                    writer.write_members(key, members)
                    kept_cos.append(cos)
                else:
                    dropped[why] += 1
            if progress is not None:
                progress(url, writer.count)
    except BaseException:
        writer.abort()
        raise
    shards = writer.close()
    report = {
        "kept": writer.count, "seen": seen, "dropped": dropped, "bad_samples": bad,
        "threshold": cut, "scored_pairs": int(len(cosines)),
        "rules": {"min_score": rules.min_score, "keep_fraction": rules.keep_fraction,
                  "min_caption_words": rules.min_caption_words, "english": rules.english,
                  "excluded_listed": len(rules.exclude)},
        "shards_without_scores": unknown, "out": out_dir, "shards": len(shards),
        "histogram": f"{out_dir}/{HISTOGRAM}",
        "seconds": round(time.perf_counter() - start, 3),
    }
    paths.write_bytes(f"{out_dir}/{HISTOGRAM}",
                      histogram_png(cosines, np.asarray(kept_cos, np.float32), cut))
    paths.write_text(f"{out_dir}/{REPORT}", json.dumps(report, indent=1) + "\n")
    return report


def histogram_png(cosines: np.ndarray, kept: np.ndarray, cut: float) -> bytes:
    """A PNG of the cosine histogram of every scored pair, the kept ones over it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    lo = float(min(cosines.min(), cut)) if len(cosines) else -1.0
    hi = float(max(cosines.max(), cut)) if len(cosines) else 1.0
    bins = np.linspace(lo, hi + 1e-6, 61)
    ax.hist(cosines, bins=bins, color="0.7", label=f"scored ({len(cosines)})")
    ax.hist(kept, bins=bins, color="tab:blue", alpha=0.8, label=f"kept ({len(kept)})")
    if np.isfinite(cut):
        ax.axvline(cut, color="tab:red", linestyle="--", label=f"threshold {cut:.3f}")
    ax.set_xlabel("CLIP score (cosine)")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def read_exclude(path: str) -> frozenset:
    """The (shard, key) pairs of a `data dedup` list (TSV with a header; shard, key first)."""
    try:
        text = paths.read_text(path)
    except (OSError, FileNotFoundError) as e:
        raise ClipjaxError(f"--exclude {path}: {e}") from None
    out = set()
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip() or (i == 1 and line.startswith("shard\t")):
            continue
        cols = line.split("\t")
        if len(cols) < 2:
            raise ClipjaxError(f"{path}:{i}: expected `shard<TAB>key...`, got {line!r}")
        out.add((paths.canonical(cols[0]), cols[1]))
    return frozenset(out)
