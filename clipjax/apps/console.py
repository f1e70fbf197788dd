"""What the apps' CLI commands share: loading the model, reporting skipped files,
printing JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable

from clipjax.errors import ClipjaxError


def add_model_arguments(p, *, required: bool = True) -> None:
    from clipjax.commands import flags

    flags.add_workdir(p, required=required, dest="model")
    flags.add_step(p)
    p.add_argument("--batch-size", type=int, default=64, metavar="N",
                   help="images or texts per encoder batch (default 64)")
    p.add_argument("--params", choices=("raw", "ema"), default=None,
                   help="the trained params (raw, default) or their moving average (ema: a run "
                        "with train.ema_decay > 0)")


def load_model(path: str, step: int | None = None, batch_size: int = 64,
               params: str | None = None):
    import clipjax

    if batch_size < 1:
        raise ClipjaxError(f"--batch-size must be >= 1, got {batch_size}")
    return clipjax.load(path, step=step, batch_size=batch_size, params=params or "raw")


def report_skipped(skipped: Iterable, stream=None) -> int:
    """Prints `skipped: PATH: REASON` lines (items: UnreadableImage or (path, reason))."""
    stream = stream or sys.stderr
    n = 0
    for item in skipped:
        path, reason = (item.path, item.why) if hasattr(item, "path") else item
        print(f"skipped: {path}: {reason}", file=stream)
        n += 1
    return n


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")
