"""What a resumed run may change in its config, and the record of what it did change.

A workdir's `config.json` describes the run that was trained there. Resuming with a
config that changes what the saved state means (the model, the global batch, the
data source, the seed that orders the samples) is refused, naming the key: the
resumed run would silently be another run. Other changes (more steps, another
learning rate, log or checkpoint intervals, input workers) are allowed; each is
appended to `WORKDIR/config_history.jsonl` with the step it took effect at, and
`config.json` then holds the config the run continues with.
"""

from __future__ import annotations

import json
import posixpath
import time
from typing import Any

from ml_collections import ConfigDict

from clipjax import config as config_lib
from clipjax import paths
from clipjax.errors import ConfigError

HISTORY_FILE = "config_history.jsonl"
# Prefixes of keys that a resume must not change (see the module docstring).
FIXED_ON_RESUME = ("model.", "data.batch_size", "data.train.", "train.seed", "loss.kind",
                   "train.grad_accum")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def changes(saved: ConfigDict, new: ConfigDict) -> dict[str, tuple[Any, Any]]:
    """key -> (saved value, new value) for every key whose value differs."""
    a = _flat(json.loads(config_lib.to_json(saved)))
    b = _flat(json.loads(config_lib.to_json(new)))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume(saved: ConfigDict, new: ConfigDict, workdir: str) -> dict[str, tuple]:
    """The allowed changes; a ConfigError naming the first key that may not change."""
    diff = changes(saved, new)
    for key, (old, value) in diff.items():
        if any(key == p.rstrip(".") or key.startswith(p) for p in FIXED_ON_RESUME):
            raise ConfigError(
                key, f"is {value!r} but the run in {workdir} was trained with {old!r}; a "
                "resumed run cannot change it (it would silently be another run). Resume "
                f"with the saved value, or start a new --workdir (train.init_from={workdir} "
                "takes the params)")
    return diff


def record(workdir: str, step: int, diff: dict[str, tuple]) -> None:
    """Appends one line to the run's config history (rewritten whole: object stores)."""
    path = posixpath.join(paths.to_str(workdir), HISTORY_FILE)
    before = paths.read_text(path) if paths.exists(path) else ""
    line = json.dumps({"step": int(step), "time": time.time(),
                       "changed": {k: {"from": a, "to": b} for k, (a, b) in diff.items()}})
    paths.write_text(path, before + line + "\n")
