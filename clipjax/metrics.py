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
`train.peak_flops` per device, else the chip's entry in KNOWN_PEAKS (TPU v4/v5e/v5p/v6e,
A100/H100/H200), else a matmul measured at start-up (best of several). CPU devices
emulated in one process share its cores, so on CPU the peak is per process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import posixpath
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import paths

METRICS_FILE = "metrics.jsonl"
PART_ROWS = 500
_PART = re.compile(r"^metrics-(\d{5})\.jsonl$")
TB_DIR = "tb"
log = logging.getLogger("clipjax.train")


# Dense matmul peak FLOP/s per chip: (device_kind substring, bf16/f16, f32). The first match
# wins, so specific names come first. f32 on TPU runs one bf16 MXU pass at JAX's default
# precision; on NVIDIA GPUs f32 matmuls use TF32 tensor cores by default: both are the
# rates a default-precision f32 step can reach. H100/H200 are the SXM parts.
KNOWN_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("TPU v6 lite", 918e12, 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12, 918e12),
    ("TPU v5 lite", 197e12, 197e12),  # v5e
    ("TPU v5e", 197e12, 197e12),
    ("TPU v5p", 459e12, 459e12),
    ("TPU v5", 459e12, 459e12),  # v5p reports itself as "TPU v5"
    ("TPU v4", 275e12, 275e12),
    ("H200", 989e12, 494.7e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494.7e12),
    ("A100", 312e12, 156e12),
)


def known_peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """The table's per-chip peak for `device_kind` (e.g. 'TPU v5 lite') at compute
    `dtype`, or None for a chip it does not list (CPUs, among others)."""
    kind = device_kind.lower()
    for name, half, single in KNOWN_PEAKS:
        if name.lower() in kind:
            return single if dtype == "float32" else half
    return None


def measure_peak_flops(device: jax.Device | None = None, *, seconds: float = 0.5,
                       warmup: int = 3, min_runs: int = 5) -> float:
    """FLOP/s of a large square matmul on one device (float32 on CPU, bfloat16 elsewhere).

    After `warmup` untimed runs, the best of at least `min_runs` timed ones: a busy
    moment only slows some runs, so the best is an upper bound a real step can approach.
    """
    device = device or jax.local_devices()[0]
    cpu = device.platform == "cpu"
    n, dtype = (2048, jnp.float32) if cpu else (8192, jnp.bfloat16)
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    b = jax.device_put(jnp.ones((n, n), dtype), device)
    matmul = jax.jit(lambda x, y: x @ y)
    for _ in range(max(1, warmup)):
        matmul(a, b).block_until_ready()
    best, spent, runs = math.inf, 0.0, 0
    while (spent < seconds and runs < 50) or runs < min_runs:
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        dt = time.perf_counter() - t0
        best, spent, runs = min(best, dt), spent + dt, runs + 1
    return 2.0 * n**3 / best


class Peak:
    """The job's peak FLOP/s (`total`), where it came from (`source`), and the MFU
    sanity check: an MFU above 1 means the peak is wrong, so it warns once naming the
    peak; a measured peak is then measured again (best of both) for later rows."""

    def __init__(self, per_device: float, source: str, scale: int, *, measured: bool = False,
                 remeasure: Callable[[], float] | None = None):
        self.per_device, self.source, self.scale = float(per_device), source, int(scale)
        self.measured = measured
        self._remeasure = remeasure
        self.warned = False

    @property
    def total(self) -> float:
        return self.per_device * self.scale

    def describe(self) -> str:
        return f"{self.per_device / 1e12:.4g} TFLOP/s per device ({self.source})"

    def mfu(self, flops_per_step: float, step_time: float) -> float:
        if not step_time > 0 or not self.total > 0:
            return math.nan
        value = flops_per_step / step_time / self.total
        if value > 1 and not self.warned:
            self.warned = True
            hint = ("measured again for the next rows; " if self.measured else "") + \
                "set train.peak_flops to the chip's peak"
            log.warning("MFU %.3f > 1: the peak used, %s, is too low (%s)", value,
                        self.describe(), hint)
            if self.measured and self._remeasure is not None:
                with contextlib.suppress(Exception):
                    self.per_device = max(self.per_device, float(self._remeasure()))
        return value

    def __float__(self) -> float:
        return self.total


def peak(config_peak: float = 0.0, dtype: str = "bfloat16",
         devices: list[jax.Device] | None = None) -> Peak:
    """The job's peak: `train.peak_flops` per device when set, else the chip's entry in
    KNOWN_PEAKS at compute `dtype`, else a measured matmul (CPUs, unlisted chips)."""
    devices = list(jax.devices() if devices is None else devices)
    # Emulated CPU devices of a process share its cores: on CPU the peak is per process.
    scale = jax.process_count() if devices[0].platform == "cpu" else len(devices)
    if float(config_peak):
        return Peak(float(config_peak), "train.peak_flops", scale)
    kind = getattr(devices[0], "device_kind", "")
    known = known_peak_flops(kind, dtype) if devices[0].platform != "cpu" else None
    if known:
        return Peak(known, f"{kind} {dtype} table", scale)
    return Peak(measure_peak_flops(), f"matmul measured on {kind or devices[0].platform}",
                scale, measured=True, remeasure=lambda: measure_peak_flops(seconds=1.0))


def peak_flops_total(config_peak: float, devices: list[jax.Device] | None = None) -> float:
    """The job's peak FLOP/s: per-device peak (config, table or measured) × independent
    devices."""
    return peak(config_peak, devices=devices).total


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
