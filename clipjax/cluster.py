"""Where this process sits in a multi-host job, read from the scheduler's environment.

`launch/slurm.sbatch` runs `python -m clipjax.cluster slurm` on each task to
turn SLURM's variables into the `--config.runtime.*` overrides that
`clipjax train` passes to `jax.distributed.initialize`; keeping the parsing
here (not in bash) makes it testable without a cluster.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping

from clipjax.errors import ClipjaxError

DEFAULT_PORT = 8476


def expand_hostlist(hostlist: str) -> list[str]:
    """Expands SLURM's compressed host lists: `gpu[01-03,07],login1` -> gpu01 gpu02 ...."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", hostlist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not m:
            hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{part}{suffix}")
    return hosts


def from_slurm(environ: Mapping[str, str] | None = None, port: int | None = None) -> dict:
    """The jax.distributed arguments of this SLURM task: one process per task."""
    env = os.environ if environ is None else environ
    missing = [k for k in ("SLURM_PROCID", "SLURM_NTASKS") if k not in env]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get(
        "SLURM_NODELIST")
    if missing or not nodelist:
        raise ClipjaxError(
            "not inside a SLURM job step (missing " + ", ".join(missing or ["SLURM_JOB_NODELIST"])
            + "); run under srun")
    hosts = expand_hostlist(nodelist)
    if port is None:
        # A port derived from the job id lets two jobs share a first node.
        job = int(env.get("SLURM_JOB_ID", "0") or 0)
        port = DEFAULT_PORT + job % 1000
    return {
        "coordinator_address": f"{hosts[0]}:{port}",
        "num_processes": int(env["SLURM_NTASKS"]),
        "process_id": int(env["SLURM_PROCID"]),
    }


def config_overrides(args: Mapping) -> list[str]:
    """The `--config.runtime.*` flags that hand these arguments to `clipjax train`."""
    flags = ["--config.runtime.distributed=on"]
    for key in ("coordinator_address", "num_processes", "process_id"):
        flags.append(f"--config.runtime.{key}={args[key]}")
    return flags


def main(argv: list[str]) -> int:
    if argv[:1] != ["slurm"]:
        print("usage: python -m clipjax.cluster slurm", file=sys.stderr)
        return 2
    try:
        args = from_slurm()
    except ClipjaxError as e:
        print(f"clipjax.cluster: error: {e}", file=sys.stderr)
        return 1
    print(" ".join(config_overrides(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
