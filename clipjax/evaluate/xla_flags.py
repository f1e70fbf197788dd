"""XLA flags for the evaluator's CPU inference, set before JAX creates its backend.

No JAX import here: the flags must be in the environment before the first
computation, so callers import this module first thing.
"""

from __future__ import annotations

import os

YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="


def tune_cpu_flags(environ=None) -> bool:
    """Turns XLA's YNNPACK fusions off for CPU inference, unless the user chose a setting.

    Measured on the bench_s image tower (2-core Zen 4, batch 64): with the fusions
    on, the encode runs on one core (wall ≈ CPU time, 3.7 s per 256 images); off,
    XLA's own kernels use both (2.2 s). Must run before JAX creates its CPU backend;
    returns whether it changed XLA_FLAGS.
    """
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    if "ynn_fusion_type" in flags or not env.get("JAX_PLATFORMS", "").startswith("cpu"):
        return False
    env["XLA_FLAGS"] = f"{flags} {YNN_OFF}".strip()
    return True
