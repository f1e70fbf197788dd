"""Cloud TPU slice names (`v5e-256`, `v5p-128`, `v4-64`, ...) as compile targets.

`clipjax compile` lowers the real train step for a TPU slice on any machine
with libtpu installed (the `tpu` extra); this module turns the name users rent
by into the arguments of `jax.experimental.topologies.get_topology_desc` and
holds the per-chip facts (HBM, peak bf16 FLOP/s) that the report compares to.

Naming facts: v5e and v6e names count chips and slices are 2-D; v4 and v5p
names count TensorCores (two per chip, fused as one "megacore" device) and
slices are 3-D. Hosts hold a 2×2 block of chips.
"""

from __future__ import annotations

import dataclasses
import math
import re

from clipjax.errors import ClipjaxError

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Generation:
    prefix: str  # get_topology_desc's topology_name prefix
    dims: int  # 2-D or 3-D torus
    cores_per_chip_in_name: int  # how the slice name counts
    chip_config: str
    hbm_bytes: int
    peak_bf16_flops: float


GENERATIONS = {
    "v4": Generation("v4", 3, 2, "megacore", 32 * GiB, 275e12),
    "v5e": Generation("v5e", 2, 1, "default", 16 * GiB, 197e12),
    "v5litepod": Generation("v5e", 2, 1, "default", 16 * GiB, 197e12),
    "v5p": Generation("v5", 3, 2, "megacore", 95 * GiB, 459e12),
    "v6e": Generation("v6e", 2, 1, "default", 32 * GiB, 918e12),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str
    generation: Generation
    shape: tuple[int, ...]  # chips per torus dimension
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def topology_name(self) -> str:
        return f"{self.generation.prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        # Full-size dimensions close into a torus: 16 on the 2-D chips, >= 4 on a 3-D cube.
        if self.generation.dims == 2:
            w = tuple(n == 16 for n in self.shape) + (False,)
        else:
            cube = all(n >= 4 for n in self.shape)
            w = tuple(cube for _ in self.shape)
        return w  # type: ignore[return-value]

    def devices(self):
        """The abstract TPU devices of this slice (or slices), for AOT compilation."""
        import os

        from jax.experimental import topologies

        # Compiling needs no chip: don't let another process's libtpu lock stop us.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        bounds = tuple(min(2, n) for n in self.shape[:2]) + (1,)
        try:
            topo = topologies.get_topology_desc(
                platform="tpu", topology_name=self.topology_name,
                chip_config_name=self.generation.chip_config, chips_per_host_bounds=bounds,
                num_slices=self.num_slices, wrap=self.wrap)
        except Exception as e:  # libtpu missing or the shape rejected
            hint = (" Install the TPU extra: pip install 'clipjax[tpu]'"
                    if "libtpu" not in str(e) or "not found" in str(e) else "")
            raise ClipjaxError(f"cannot describe TPU topology {self.name}: {e}.{hint}") from e
        return list(topo.devices)


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _shape_2d(chips: int) -> tuple[int, ...]:
    if not _power_of_two(chips):
        raise ValueError
    x = 2 ** ((chips.bit_length() - 1) // 2)
    return (x, chips // x)


def _shape_3d(chips: int) -> tuple[int, ...]:
    # Cloud TPU's standard cubes: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...: from
    # 2x2x1 keep doubling the smallest dimension, the last one on ties.
    if chips < 4 or not _power_of_two(chips):
        raise ValueError
    dims = [2, 2, 1]
    while dims[0] * dims[1] * dims[2] < chips:
        smallest = min(dims)
        i = max(k for k in range(3) if dims[k] == smallest)
        dims[i] *= 2
    return tuple(dims)


def parse(name: str, num_slices: int = 1) -> Slice:
    """`v5e-256`, `v5p-128`, `v4-64`, `v6e-8`, or an explicit `v5e:16x16` / `v5p:4x4x8`."""
    if num_slices < 1:
        raise ClipjaxError(f"--num-slices must be >= 1; got {num_slices}")
    text = name.strip().lower()
    m = re.fullmatch(r"(v4|v5e|v5litepod|v5p|v6e)[-:](\d+(?:x\d+)*)", text)
    if not m:
        raise ClipjaxError(
            f"unknown TPU topology {name!r}; use a Cloud TPU name such as v5e-256, v5p-128, "
            f"v4-64, v6e-64, or an explicit shape such as v5e:16x16 (generations: "
            f"{', '.join(sorted(GENERATIONS))})")
    gen = GENERATIONS[m.group(1)]
    spec = m.group(2)
    try:
        if "x" in spec:
            shape = tuple(int(n) for n in spec.split("x"))
            if len(shape) != gen.dims or min(shape) < 1:
                raise ValueError
        else:
            count = int(spec)
            if count % gen.cores_per_chip_in_name:
                raise ValueError
            chips = count // gen.cores_per_chip_in_name
            shape = _shape_2d(chips) if gen.dims == 2 else _shape_3d(chips)
    except ValueError:
        raise ClipjaxError(
            f"TPU topology {name!r} is not a standard {m.group(1)} slice; give its shape "
            f"explicitly, e.g. {m.group(1)}:{'4x4x12' if gen.dims == 3 else '8x16'}") from None
    return Slice(name=name, generation=gen, shape=shape, num_slices=num_slices)
