"""Ahead-of-time compilation of the real train step for a TPU slice, on any machine.

Renting a pod to find an out-of-memory at step 0 costs hours; XLA's TPU
compiler (libtpu) runs on a CPU host and reports per-chip memory, so
`clipjax compile` builds the same `TrainProgram` that `clipjax train` runs,
over the abstract devices of the requested topology, and compiles it.

Multi-slice (`--num-slices N`): the mesh gets its `slices` axis over the
slices' devices (`mesh.slices = N`), and the report lists, from the compiled
HLO, the collectives whose replica groups span slices: the traffic that crosses
the data-center network.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from clipjax import hlo, metrics, models, sharding, topology
from clipjax.errors import ConfigError
from clipjax.train import program as program_lib


@dataclasses.dataclass
class CompileReport:
    topology: str
    topology_name: str
    num_slices: int
    chips: int
    mesh: dict[str, int]
    global_batch: int
    argument_bytes: int  # per chip: params, optimizer state, batch
    output_bytes: int
    alias_bytes: int  # outputs written in place of donated arguments
    temp_bytes: int  # activations and scratch
    per_chip_bytes: int
    hbm_bytes_per_chip: int
    fits: bool
    flops_per_step: float  # analytic model FLOPs for the global batch
    flops_per_chip: float
    step_time_lower_bound_s: float  # flops_per_chip / peak bf16 FLOP/s
    compile_seconds: float
    compiler_oom: bool  # libtpu refused it; temp_bytes is what its error said it needs
    kernels: str = ""  # model.kernels as resolved for the target: cpu | xla
    # Collectives whose replica groups span slices (data-center network), from the HLO:
    # {kind: {"count": instructions, "bytes": result bytes per chip, summed}}; a collective
    # inside a loop (scanned layers, micro-batches) runs once per iteration.
    cross_slice: dict = dataclasses.field(default_factory=dict)
    cross_slice_ops: list = dataclasses.field(default_factory=list)  # "kind shape", largest first

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _with_slices(config: ConfigDict, num_slices: int) -> tuple[ConfigDict, int]:
    """The config with `mesh.slices` = the slice count (`--num-slices`, or the config's own)."""
    configured = int(config.mesh.get("slices", 1))
    if num_slices == 1 and configured > 1:
        num_slices = configured
    elif configured not in (1, num_slices):
        raise ConfigError("mesh.slices", f"{configured} differs from --num-slices {num_slices}")
    if configured == num_slices:
        return config, num_slices
    config = copy.deepcopy(config)
    config.mesh.slices = num_slices
    return config, num_slices


def compile_for_topology(config: ConfigDict, name: str, num_slices: int = 1,
                         save: str | None = None) -> CompileReport:
    config, num_slices = _with_slices(config, num_slices)
    slc = topology.parse(name, num_slices)
    devices = slc.devices()
    mesh = sharding.make_mesh(config.mesh, devices)
    start = time.perf_counter()
    platform = devices[0].platform
    # model.kernels=auto picks the kernels of the target (TPU), not of this CPU host.
    with models.target_platform(platform):
        kernels = models.resolve_kernels(config.model.kernels)
        program = program_lib.build(config, mesh)
        lowered = program.lower()
    try:
        compiled = lowered.compile()
    except Exception as e:  # libtpu refuses programs that overflow HBM: that is the answer
        need = _required_bytes(str(e))
        if need is None:
            raise
        compiled = None
        args = _shard_bytes((program.abstract_state, program.abstract_batch()))
        out = alias = args  # the state is donated: outputs overwrite it in place
        temp = need
    else:
        mem = compiled.memory_analysis()
        args, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
        alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    seconds = time.perf_counter() - start
    # Donated state aliases its outputs: count those bytes once.
    per_chip = args + out - alias + temp
    flops = metrics.model_flops_per_step(config)
    hbm = slc.generation.hbm_bytes
    cross, ops = {}, []
    if compiled is not None and num_slices > 1:
        found = hlo.crossing(hlo.collectives(compiled.as_text()), hlo.slice_coordinates(mesh))
        cross = hlo.summarize(found)
        ops = [f"{c.kind} {c.shape}" for c in sorted(found, key=lambda c: -c.bytes)[:20]]
    if save and compiled is not None:
        _serialize(compiled, save)
    return CompileReport(
        topology=name, topology_name=slc.topology_name, num_slices=num_slices, chips=slc.chips,
        mesh=dict(mesh.shape), global_batch=int(config.data.batch_size), argument_bytes=args,
        output_bytes=out, alias_bytes=alias, temp_bytes=temp, per_chip_bytes=per_chip,
        hbm_bytes_per_chip=hbm, fits=per_chip <= hbm, flops_per_step=flops,
        flops_per_chip=flops / slc.chips,
        step_time_lower_bound_s=flops / slc.chips / slc.generation.peak_bf16_flops,
        compile_seconds=seconds, compiler_oom=compiled is None, kernels=kernels,
        cross_slice=cross, cross_slice_ops=ops)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _required_bytes(message: str) -> int | None:
    """The memory an out-of-HBM compile error says the program needs (None: another error)."""
    if "RESOURCE_EXHAUSTED" not in message:
        return None
    m = re.search(r"required for [^(]*\(([\d.]+)([KMGT]?)", message)
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None


def _shard_bytes(tree) -> int:
    """Bytes of one device's shards of an abstract (sharded) pytree."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def _serialize(compiled, path: str) -> None:
    """Writes the executable (jax's serialize_executable) so a pod can load it unchanged."""
    import pickle

    from jax.experimental import serialize_executable

    payload = serialize_executable.serialize(compiled)
    with open(path, "wb") as f:
        pickle.dump(payload, f)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} GiB"


def format_report(r: CompileReport) -> str:
    gib = 1 << 30

    def g(n):
        return f"{n / gib:8.2f} GiB"

    verdict = "fits" if r.fits else "does not fit"
    lines = [
        f"topology        {r.topology} ({r.topology_name}, {r.num_slices} slice(s), "
        f"{r.chips} chips)",
        f"mesh            {r.mesh}   global batch {r.global_batch}   kernels {r.kernels}",
        f"arguments       {g(r.argument_bytes)}   (params, optimizer state, batch; per chip)",
        f"temporaries     {g(r.temp_bytes)}",
        f"outputs         {g(r.output_bytes)}   ({g(r.alias_bytes).strip()} donated in place)",
        f"total per chip  {g(r.per_chip_bytes)}   of {g(r.hbm_bytes_per_chip).strip()} HBM: "
        f"{verdict}" + (" (XLA's TPU compiler ran out of HBM)" if r.compiler_oom else ""),
        f"model FLOPs     {r.flops_per_step:.3e} per step, {r.flops_per_chip:.3e} per chip "
        f"(>= {r.step_time_lower_bound_s * 1e3:.1f} ms/step at peak bf16)",
        f"compiled in     {r.compile_seconds:.1f} s",
    ]
    if r.num_slices > 1:
        if r.cross_slice:
            kinds = ", ".join(f"{k} x{v['count']} ({_human(v['bytes'])})"
                              for k, v in sorted(r.cross_slice.items()))
            lines.append(f"across slices   {kinds}   (DCN; bytes per chip per run)")
            lines.extend(f"                {op}" for op in r.cross_slice_ops[:5])
        else:
            lines.append("across slices   " + ("unknown (not compiled)" if r.compiler_oom
                                                else "no collective crosses the slices"))
    return "\n".join(lines)
