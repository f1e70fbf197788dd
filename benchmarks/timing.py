"""What the benchmarks share: timing a callable the same way on every side."""

from __future__ import annotations

import statistics
import time


def timed(fn, repeats: int):
    """(median wall s, median process CPU s, fn's last result) over `repeats` runs after
    one untimed warm-up (where clipjax compiles)."""
    fn()
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), result
