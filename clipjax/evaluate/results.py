"""Where evaluation results go: JSON per (task, step), TensorBoard scalars, PNG plots.

    DIR/eval/<task>/<step>.json      {"step", "task", "num_examples", metrics...}
    DIR/eval/<task>/<metric>.png     each headline metric against the step
    DIR/eval/<task>/confusion_<step>.png   (optional)
    DIR/tb/eval/                     TensorBoard events, tags "<task>/<metric>"

DIR may be relative, absolute or a URI (`gs://...`): every file goes through
`clipjax.paths`, which replaces a file whole (tmp + rename locally, one object
upload remotely), so a reader never sees half of one. TensorBoard events on an
object store are uploaded whole at each flush (`clipjax.tensorboard`). Nothing
here touches DIR/checkpoints/.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Mapping

import numpy as np

from clipjax import paths

EVAL_DIR = "eval"
TB_DIR = "tb/eval"
HEADLINE = ("top1", "image_to_text_R@1", "text_to_image_R@1")


def task_dir(workdir: str, task: str) -> str:
    return os.fspath(paths.join(workdir, EVAL_DIR, task))


def result_path(workdir: str, task: str, step: int) -> str:
    return os.fspath(paths.join(workdir, EVAL_DIR, task, f"{step}.json"))


def write_json(workdir: str, task: str, step: int, record: Mapping) -> str:
    path = result_path(workdir, task, step)
    paths.write_text(path, json.dumps(dict(record), indent=2, sort_keys=False) + "\n")
    return path


def read_all(workdir: str, task: str) -> list[dict]:
    """Every result of one task, sorted by step."""
    d = task_dir(workdir, task)
    out = []
    for name in paths.listdir(d):
        if re.fullmatch(r"\d+\.json", name):
            out.append(json.loads(paths.read_text(paths.join(d, name))))
    return sorted(out, key=lambda r: r["step"])


def metric_names(record: Mapping) -> list[str]:
    skip = {"step", "task", "num_examples", "num_train", "mode", "num_classes",
            "num_templates", "num_texts", "checkpoint", "seconds", "l2"}
    return [k for k, v in record.items()
            if k not in skip and isinstance(v, int | float) and not isinstance(v, bool)]


class TensorBoard:
    """Scalars under DIR/tb/eval, one tag per task and metric."""

    def __init__(self, workdir: str):
        from clipjax.tensorboard import summary_writer

        self.writer = summary_writer(paths.join(workdir, TB_DIR))

    def write(self, task: str, record: Mapping) -> None:
        for name in metric_names(record):
            value = float(record[name])
            if math.isfinite(value):
                self.writer.add_scalar(f"{task}/{name}", value, int(record["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def plot(workdir: str, task: str) -> list[str]:
    """One PNG per headline metric of a task: its value at each evaluated step."""
    records = read_all(workdir, task)
    if not records:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    names = [m for m in HEADLINE if any(m in r for r in records)]
    for name in names:
        pts = [(r["step"], r[name]) for r in records if name in r]
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel(f"{name} (%)")
        ax.set_title(f"{task}: {name}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.fspath(paths.join(task_dir(workdir, task), f"{_safe(name)}.png"))
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def plot_confusion(workdir: str, task: str, step: int, cm: np.ndarray,
                   classnames: list[str]) -> str:
    """A row-normalised confusion matrix (true class by row) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = len(classnames)
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = min(4 + 0.35 * c, 30)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    if c <= 50:
        ax.set_xticks(range(c), classnames, rotation=90, fontsize=8)
        ax.set_yticks(range(c), classnames, fontsize=8)
        if c <= 20:
            for i in range(c):
                for j in range(c):
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{task} @ step {step}")
    fig.tight_layout()
    path = os.fspath(paths.join(task_dir(workdir, task), f"confusion_{step}.png"))
    _save(fig, path)
    plt.close(fig)
    return path


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _save(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    paths.write_bytes(path, buf.getvalue())
