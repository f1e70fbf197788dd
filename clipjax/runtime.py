"""Process set-up that must happen before JAX starts: allocator, CPU flags.

On CPU a CLIP step spends seconds in page faults under glibc malloc (see
DESIGN.md); tcmalloc, or glibc's hugetlb tunable, removes them. An allocator
can only be chosen at exec time, so the console script re-executes itself
once with it. Settings the user made always win.
"""

from __future__ import annotations

import glob
import os
import sys

_TCMALLOC_GLOBS = (
    "/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
)
_MARK = "CLIPJAX_ALLOCATOR_SET"


def find_tcmalloc() -> str | None:
    for pattern in _TCMALLOC_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def _accelerator_present() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return not platforms.startswith("cpu")
    devices = ("/dev/accel*", "/dev/nvidia[0-9]*", "/dev/vfio/[0-9]*")
    return any(glob.glob(pattern) for pattern in devices)


def allocator_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment additions for the fast allocator; empty when the user chose one."""
    env = os.environ if environ is None else environ
    if env.get("CLIPJAX_ALLOCATOR", "auto") == "system" or env.get(_MARK):
        return {}
    if "LD_PRELOAD" in env or "GLIBC_TUNABLES" in env:
        return {}
    lib = find_tcmalloc()
    if lib:
        return {"LD_PRELOAD": lib, _MARK: "tcmalloc"}
    return {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", _MARK: "hugetlb"}


def configure_process() -> None:
    """On CPU-only machines: pin JAX to the CPU and re-execute once under the fast allocator.

    Pinning the platform keeps an installed libtpu (the `tpu` extra, used by
    `clipjax compile`) from probing for TPU hardware at every start.
    """
    if _accelerator_present():
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    extra = allocator_env()
    if not extra:
        return
    env = dict(os.environ, **extra)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "clipjax", *sys.argv[1:]], env)
