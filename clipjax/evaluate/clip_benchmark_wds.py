"""CLIP_benchmark's published webdatasets: Hugging Face names, and per-sample metadata.

`wds:DIR` reads the layout `clip_benchmark_export_wds` writes (`datasets.wds_source`).
This module adds what the published copies need beyond a local folder:

- `wds:hf:ORG/REPO` (or `wds:https://huggingface.co/datasets/ORG/REPO[/tree/main]`), the
  names CLIP_benchmark and DataComp use (`clip-benchmark/wds_cars`,
  `djghosh/wds_fairness-geode_test`): the metadata files and the test shards are
  downloaded once with `huggingface_hub` into a cache (`$CLIPJAX_WDS_CACHE`, else
  `~/.cache/clipjax/wds`), then read like any local folder;
- the `.npy` metadata DataComp's fairness sets carry per sample (the group of each image,
  for worst-group accuracy).
"""

from __future__ import annotations

import io
import os
import re

import numpy as np

from clipjax import paths
from clipjax.errors import ClipjaxError

HF_PREFIX = "hf:"
_HF_URL = re.compile(r"^https://huggingface\.co/datasets/([^/]+/[^/]+)(/tree/[^/]+)?/?$")


def cache_dir() -> str:
    return os.environ.get("CLIPJAX_WDS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "clipjax", "wds")


def hf_repo(arg: str) -> str | None:
    """ORG/REPO when `arg` names a Hugging Face dataset, else None."""
    if arg.startswith(HF_PREFIX):
        repo = arg[len(HF_PREFIX):].strip("/")
        if repo.count("/") != 1:
            raise ClipjaxError(f"wds:{arg}: expected hf:ORG/REPO")
        return repo
    m = _HF_URL.match(arg)
    return m.group(1) if m else None


def resolve(arg: str, split: str = "test") -> str:
    """A local (or gs://) folder for a `wds:` argument, downloading Hugging Face datasets."""
    repo = hf_repo(arg)
    if repo is None:
        return arg
    target = os.path.join(cache_dir(), repo.replace("/", "--"))
    if paths.glob(paths.join(target, split, "*.tar")):
        return target
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ClipjaxError(f"wds:{arg}: downloading needs huggingface_hub "
                           "(pip install huggingface-hub)") from None
    try:
        snapshot_download(repo, repo_type="dataset", local_dir=target,
                          allow_patterns=["*.txt", f"{split}/*"])
    except Exception as e:  # network, auth or a missing repo: one line, not a traceback
        raise ClipjaxError(f"wds:{arg}: cannot download {repo} from the Hugging Face Hub: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not paths.glob(paths.join(target, split, "*.tar")):
        raise ClipjaxError(f"wds:{arg}: {repo} has no {split}/*.tar shards")
    return target


def group_ids(root: str, split: str = "test", column: int = 0) -> np.ndarray | None:
    """Column `column` of each sample's `.npy` metadata, in sample order; None when the
    samples carry no metadata."""
    from clipjax.evaluate import datasets

    shards = paths.glob(paths.join(root, split, "*.tar"))
    out = []
    for sample in datasets.tar_samples(shards, wanted=("npy",)):
        if "npy" not in sample:
            return None
        meta = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
        out.append(np.asarray(meta).reshape(-1)[column])
    return np.asarray(out) if out else None
