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


def pin_cpu_when_no_accelerator() -> None:
    """On a machine with no accelerator device: JAX_PLATFORMS=cpu, so an installed libtpu
    (the `tpu` extra, used by `clipjax compile`) does not probe for TPU hardware and print
    its warnings. A TPU or GPU host (its /dev nodes exist) and a user's own JAX_PLATFORMS
    are left alone. Runs at `import clipjax`; effective while JAX has no backend yet."""
    if _accelerator_present():
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    jax = sys.modules.get("jax")
    if jax is None:
        return
    try:  # jax was imported first: its config read the environment already
        from jax._src import xla_bridge

        if not xla_bridge._backends and not jax.config.jax_platforms:
            jax.config.update("jax_platforms", "cpu")
    except (ImportError, AttributeError):
        pass


def configure_process() -> None:
    """On CPU-only machines: pin JAX to the CPU and re-execute once under the fast allocator.

    Pinning the platform keeps an installed libtpu (the `tpu` extra, used by
    `clipjax compile`) from probing for TPU hardware at every start.
    """
    if _accelerator_present():
        return
    pin_cpu_when_no_accelerator()
    extra = allocator_env()
    if not extra:
        return
    env = dict(os.environ, **extra)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "clipjax", *sys.argv[1:]], env)


def _on_tpu_pod(env) -> bool:
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def _under_slurm(env) -> bool:
    return int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env


def initialize_distributed(runtime_cfg, environ: dict[str, str] | None = None) -> bool:
    """Calls `jax.distributed.initialize` when the job spans several processes.

    `runtime.distributed`: 'off' never; 'on' always; 'auto' when a coordinator
    is configured, on a multi-host TPU pod, or in a multi-task SLURM step. Explicit
    `coordinator_address` / `num_processes` / `process_id` are passed through
    (CPU multi-process runs need them); otherwise JAX discovers them itself
    (TPU metadata, SLURM variables). Must run before anything touches a device.
    Returns whether it initialised.
    """
    import jax

    env = os.environ if environ is None else environ
    mode = runtime_cfg.distributed
    explicit = bool(runtime_cfg.coordinator_address)
    if mode == "off" or (mode == "auto" and not (explicit or _on_tpu_pod(env)
                                                 or _under_slurm(env))):
        return False
    kwargs = {}
    if runtime_cfg.coordinator_address:
        kwargs["coordinator_address"] = runtime_cfg.coordinator_address
    if runtime_cfg.num_processes:
        kwargs["num_processes"] = int(runtime_cfg.num_processes)
    if runtime_cfg.process_id >= 0:
        kwargs["process_id"] = int(runtime_cfg.process_id)
    jax.distributed.initialize(**kwargs)
    return True


def use_compilation_cache(directory: str) -> None:
    """Points JAX's persistent compilation cache at `directory` (any path clipjax reads:
    relative, absolute or gs://); '' leaves JAX's own setting alone."""
    if not directory:
        return
    import jax

    from clipjax import paths

    jax.config.update("jax_compilation_cache_dir", paths.to_str(directory))
