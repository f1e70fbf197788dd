"""The device mesh, logical-axis rules, and host-local → global arrays.

Data parallel, FSDP and tensor parallel are not code paths here: they are the
mesh axis sizes in `config.mesh` together with the logical-axis rules in
`config.sharding_rules`, which map the names models put on their params and
activations (`batch`, `embed`, `mlp`, ...) to mesh axes.

Multi-slice: `mesh.slices > 1` adds a leading `slices` mesh axis, the one that
crosses the data-center network. The default rules put the batch over it and
nothing else, so params and optimizer state are replicated across slices and
sharded within one (FSDP/TP traffic stays on the slice's ICI; only gradient
reductions and the loss cross slices). TPU devices that carry `slice_index`
are laid out with `mesh_utils.create_hybrid_device_mesh`; other devices (the
emulated CPU mesh, GPU hosts) split into pseudo-slices of consecutive devices.
With `mesh.slices = 1` the mesh has no `slices` axis and rules naming it drop it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from clipjax.errors import ConfigError


class ShardingWarning(UserWarning):
    """A param dimension a mesh axis does not divide: that dimension is replicated."""


class Rules(tuple):
    """Logical-axis rules, the `(logical_name, mesh_axes)` pairs flax expects, carrying
    `strict`: whether a param the rules cannot shard is an error (`sharding.strict`)."""

    strict: bool = False

    def __new__(cls, pairs=(), strict: bool = False):
        obj = super().__new__(cls, pairs)
        obj.strict = bool(strict)
        return obj


_WARNED: set[tuple] = set()
SLICES = "slices"  # the mesh axis over slices (data-center network)


def mesh_shape(mesh_cfg: ConfigDict | Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Axis sizes in config order, with the one `-1` axis taking the devices the others leave."""
    sizes = {k: int(mesh_cfg[k]) for k in mesh_cfg}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if num_devices % fixed:
        raise ConfigError("mesh", f"axis sizes {sizes} do not divide {num_devices} devices")
    for k, v in sizes.items():
        if v == -1:
            sizes[k] = num_devices // fixed
    total = math.prod(sizes.values())
    if total != num_devices:
        raise ConfigError("mesh", f"axis sizes {sizes} use {total} of {num_devices} devices")
    return sizes


def device_slices(devices: Sequence[Any]) -> int:
    """How many slices the devices span (TPU multi-slice devices carry `slice_index`)."""
    ids = {getattr(d, "slice_index", None) for d in devices}
    ids.discard(None)
    return max(len(ids), 1)


def make_mesh(mesh_cfg: ConfigDict | Mapping[str, int],
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all (global) devices with Auto axes, which linen's logical constraints need.

    Axes in config order; with `slices > 1`, a leading `slices` axis: over the devices'
    own slices (hybrid ICI x DCN mesh) where they carry `slice_index`, else over
    consecutive blocks of `devices` (pseudo-slices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_cfg, len(devices))
    slices = sizes.pop(SLICES, 1)
    spanned = device_slices(devices)
    if spanned > 1 and spanned != slices:
        raise ConfigError("mesh.slices", f"the {len(devices)} devices span {spanned} slices; "
                          f"set mesh.slices={spanned} (got {slices})")
    names, shape = tuple(sizes), tuple(sizes.values())
    if slices == 1:
        return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names),
                             devices=devices)
    names, auto = (SLICES, *names), (AxisType.Auto,) * (len(names) + 1)
    if spanned > 1:
        grid = mesh_utils.create_hybrid_device_mesh(
            (1, *shape), (slices, *(1,) * len(shape)), devices,
            allow_split_physical_axes=True)
        return Mesh(grid, names, axis_types=auto)
    return jax.make_mesh((slices, *shape), names, axis_types=auto, devices=devices)


def device_mesh(devices: Sequence[jax.Device] | None = None, axis: str = "data") -> Mesh:
    """A 1-D mesh over `devices` (default: this process's), for the data-parallel
    programs of evaluation and inference: the batch is split over `axis`. The devices
    keep their order (no physical-topology layout, which a subset such as one host's
    devices of a TPU slice would not satisfy)."""
    devices = list(jax.local_devices() if devices is None else devices)
    return Mesh(np.array(devices), (axis,), axis_types=(AxisType.Auto,))


def rules(config: ConfigDict) -> Rules:
    """`config.sharding_rules` as the tuple of pairs flax expects (with `sharding.strict`);
    the `slices` axis leaves the rules when the mesh has none (`mesh.slices = 1`)."""
    single = int(config.mesh.get(SLICES, 1)) == 1
    out = []
    for name, target in config.sharding_rules:
        if isinstance(target, list | tuple):
            kept = tuple(t for t in target if not (single and t == SLICES))
            if len(kept) < len(target):
                kept = kept[0] if len(kept) == 1 else (kept or None)
            target = kept
        elif single and target == SLICES:
            target = None
        out.append((name, target))
    strict = bool(config.sharding.strict) if "sharding" in config else False
    return Rules(out, strict=strict)


def axes_for(logical: str, rule_set: Rules) -> tuple[str, ...]:
    """The mesh axes a logical name maps to (the first matching rule), as a tuple."""
    for name, target in rule_set:
        if name == logical:
            if target is None:
                return ()
            return (target,) if isinstance(target, str) else tuple(target)
    return ()


def batch_axes(config: ConfigDict) -> tuple[str, ...]:
    """Mesh axes the batch dimension is split over (the `batch` rule)."""
    return axes_for("batch", rules(config))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, axes: Sequence[str], ndim: int = 1) -> NamedSharding:
    """Leading dimension split over `axes`, the rest replicated."""
    lead = tuple(axes) if len(axes) != 1 else axes[0]
    return NamedSharding(mesh, P(lead or None, *([None] * (ndim - 1))))


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, name: str = "",
             strict: bool = False) -> P:
    """Drops the mesh axes of any dimension they do not divide evenly (that dim is replicated).

    Keeps odd-sized params (a 3-channel patch kernel, a 1-d bias) legal under
    any rule set instead of failing at compile time, and says so: a
    `ShardingWarning` once per param, dimension and mesh axes (FSDP that
    quietly became replication costs memory), or with `strict` a ConfigError.
    """
    dims = list(spec) + [None] * (len(shape) - len(spec))
    out = []
    for i, (size, entry) in enumerate(zip(shape, dims)):
        axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        n = math.prod(mesh.shape[a] for a in axes) if axes else 1
        if n == 1 or size % n == 0:
            out.append(entry)
            continue
        out.append(None)
        what = f"param {name or '?'} of shape {tuple(shape)}"
        message = (f"{what}: dimension {i} (size {size}) does not split over mesh axis "
                   f"{'x'.join(axes)} (size {n}); that dimension is replicated")
        if strict:
            raise ConfigError("sharding.strict", message + " (sharding.strict=True)")
        key = (name, tuple(shape), i, axes, n)
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(message, ShardingWarning, stacklevel=2)
    return P(*out)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rule_set: Rules) -> Any:
    """NamedShardings for a (boxed, abstract) flax variable tree, from its logical axis names.

    A dimension the mapped mesh axes do not divide is replicated with a warning, or
    raises ConfigError when the rules are strict (`sharding.strict`)."""
    specs = nn.get_partition_spec(abstract_boxed)
    mesh_specs = nn.logical_to_mesh(specs, rule_set)
    shapes = nn.meta.unbox(abstract_boxed)
    strict = bool(getattr(rule_set, "strict", False))

    def one(path, spec, x):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        return NamedSharding(mesh, fit_spec(spec, x.shape, mesh, name, strict))

    return jax.tree_util.tree_map_with_path(one, mesh_specs, shapes,
                                            is_leaf=lambda s: isinstance(s, P))


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh,
              axes: Sequence[str]) -> dict[str, jax.Array]:
    """Host-local numpy batch → global jax.Arrays split over `axes` (each process feeds its own)."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, axes, v.ndim), v)
    return out


def describe(shardings: Any) -> dict[str, str]:
    """`path -> PartitionSpec` strings, for logs and tests."""
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): str(s.spec)
            for path, s in flat}
