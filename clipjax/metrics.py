"""Training metrics: WORKDIR/metrics.jsonl, TensorBoard scalars, a progress bar, and MFU.

Only process 0 writes. The file contract: one JSON object per logged step, readable
while the run goes. On a local disk that is one appended file, `metrics.jsonl`. An
object store (`gs://`) cannot append, so there the rows go to numbered part files
`metrics-00000.jsonl`, `metrics-00001.jsonl`, … of at most PART_ROWS rows each, the
last one rewritten whole at every logged step (an upload stays bounded however long
the run); `read(workdir)` joins them, in either layout.

MFU = model FLOPs per second over the devices' peak.
Model FLOPs are counted analytically from the architecture
(`clipjax.models.flops`: 3 × forward for a trained tower, recomputation such
as GradCache's extra forward or remat not counted); the peak is
`train.peak_flops` per device or a matmul measured at start-up. CPU devices
emulated in one process share its cores, so on CPU the peak is per process.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import paths

METRICS_FILE = "metrics.jsonl"
PART_ROWS = 500
_PART = re.compile(r"^metrics-(\d{5})\.jsonl$")
TB_DIR = "tb"


def measure_peak_flops(device: jax.Device | None = None, *, seconds: float = 0.5) -> float:
    """FLOP/s of a large square matmul on one device (float32 on CPU, bfloat16 elsewhere).

    The best of a few timed runs: an upper bound a real step can approach.
    """
    device = device or jax.local_devices()[0]
    cpu = device.platform == "cpu"
    n, dtype = (2048, jnp.float32) if cpu else (8192, jnp.bfloat16)
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    b = jax.device_put(jnp.ones((n, n), dtype), device)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best, spent, runs = math.inf, 0.0, 0
    while (spent < seconds and runs < 20) or runs < 3:
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        dt = time.perf_counter() - t0
        best, spent, runs = min(best, dt), spent + dt, runs + 1
    return 2.0 * n**3 / best


def peak_flops_total(config_peak: float, devices: list[jax.Device] | None = None) -> float:
    """The job's peak FLOP/s: per-device peak (config or measured) × independent devices."""
    devices = list(jax.devices() if devices is None else devices)
    per_device = float(config_peak) or measure_peak_flops()
    if devices[0].platform == "cpu":  # emulated CPU devices of a process share its cores
        return per_device * jax.process_count()
    return per_device * len(devices)


def model_flops_per_step(config, frozen_towers: tuple[str, ...] = (),
                         pooled_last: bool | None = None) -> float:
    """Analytic model FLOPs of one step: forward + backward (3×) of each trained tower, the
    forward only of a frozen one (LiT), and the B×B logits, times the global batch B.
    `pooled_last=False` counts every token through the last block (open_clip's work).
    Image tokens are those `model.image.patch_dropout` keeps."""
    from clipjax.models import flops

    batch = int(config.data.batch_size)
    forward = flops.forward_flops(config.model, pooled_last, training=True)
    per_sample = sum((1.0 if tower in frozen_towers else flops.TRAIN_MULTIPLIER) * forward[tower]
                     for tower in ("image", "text"))
    per_sample += flops.loss_flops_per_sample(config.model, batch)
    return per_sample * batch


def _scalar(v: Any) -> Any:
    if isinstance(v, np.ndarray | np.generic | jax.Array):
        v = np.asarray(v)
        return v.item() if v.size == 1 else v.tolist()
    return v


class MetricsWriter:
    """metrics.jsonl (or its parts) + TensorBoard + tqdm (on a terminal), from process 0.

    `start_step` > 0 (a resumed run) drops rows past it and purges TensorBoard events
    past it, so each holds one consistent history.
    """

    def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
                 enabled: bool | None = None, progress: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = paths.to_str(workdir)
        self.remote = paths.is_remote(self.workdir)
        self.path = posixpath.join(self.workdir, METRICS_FILE)
        self._tb = None
        self._bar = None
        self._file = None
        if not self.enabled:
            return
        paths.makedirs(self.workdir)
        truncate_after(self.workdir, start_step)
        if self.remote:
            parts = _parts(self.workdir)
            self._part = len(parts) - 1 if parts else 0
            self._rows = _read_lines(_part_path(self.workdir, self._part)) if parts else []
        else:
            self._file = paths.open(self.path, "a")  # closed in close()
        try:
            from clipjax.tensorboard import summary_writer

            self._tb = summary_writer(posixpath.join(self.workdir, TB_DIR),
                                      purge_step=start_step)
        except ImportError:  # TensorBoard is optional; the jsonl is the record
            self._tb = None
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step",
                             dynamic_ncols=True)

    def write(self, step: int, scalars: Mapping[str, Any]) -> dict[str, Any]:
        row = {"step": int(step), **{k: _scalar(v) for k, v in scalars.items()}}
        if not self.enabled:
            return row
        line = json.dumps(row, allow_nan=True) + "\n"
        if self.remote:
            if len(self._rows) >= PART_ROWS:
                self._part, self._rows = self._part + 1, []
            self._rows.append(line)
            paths.write_text(_part_path(self.workdir, self._part), "".join(self._rows))
        else:
            self._file.write(line)
            self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if (k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
                        and math.isfinite(v)):
                    self._tb.add_scalar(f"train/{k}", v, step)
            self._tb.flush()
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}",
                                  ips=f"{row.get('images_per_sec', 0):.1f}", refresh=False)
        return row

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


def _part_path(workdir: str, index: int) -> str:
    return posixpath.join(workdir, f"metrics-{index:05d}.jsonl")


def _parts(workdir: str) -> list[int]:
    return sorted(int(m.group(1)) for n in paths.listdir(workdir) if (m := _PART.match(n)))


def _read_lines(path: str) -> list[str]:
    return paths.read_text(path).splitlines(keepends=True)


def _files(workdir: str) -> list[str]:
    """The metrics files of a workdir, in row order (either layout)."""
    workdir = paths.to_str(workdir)
    out = [_part_path(workdir, i) for i in _parts(workdir)]
    single = posixpath.join(workdir, METRICS_FILE)
    if paths.exists(single):
        out.insert(0, single)
    return out


def _keep_until(lines: list[str], step: int) -> list[str]:
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):  # a torn last line from a killed run
            continue
    return keep


def truncate_after(workdir: str, step: int) -> None:
    """Drops the rows whose step is past `step` (they will be redone)."""
    for path in _files(workdir):
        lines = _read_lines(path)
        keep = _keep_until(lines, step)
        if len(keep) == len(lines):
            continue
        if not keep and _PART.match(posixpath.basename(path)):
            paths.resolve(path).unlink()
        else:
            paths.write_text(path, "".join(keep))


def read(workdir: str) -> list[dict[str, Any]]:
    """The rows of a workdir's metrics (metrics.jsonl, or its parts on an object store)."""
    rows = []
    for path in _files(workdir):
        rows.extend(json.loads(line) for line in _read_lines(path) if line.strip())
    return rows
