"""Collectives in a compiled program's HLO text, and which mesh axes they cross.

`clipjax compile --num-slices N` reports the collectives whose replica groups
span slices (those run over the data-center network); tests use the same
reading to assert that tensor parallelism gathers no weights. In an SPMD
program the ids in `replica_groups` / `source_target_pairs` are partition ids,
i.e. positions in the mesh's flattened device array.

On TPU multi-slice programs XLA lowers the data-center-network part of a
collective to host-transfer `send`s for the MegaScale runtime (attributes
`_xla_megascale_transfer_type="ALL_REDUCE"`, `_xla_host_transfer_rendezvous=
"all-reduce.95_0"`), next to an ICI collective within each slice: those sends
are read as collectives with `dcn=True`, one per rendezvous.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
         "collective-broadcast", "ragged-all-to-all")
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s+"
    r"(?P<kind>" + "|".join(re.escape(k) for k in KINDS) + r")(?P<start>-start)?\(")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_SEND = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*\((?P<shape>.+?)\)\s+send\(")


@dataclasses.dataclass(frozen=True)
class Collective:
    name: str
    kind: str  # all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute, ...
    shape: str  # the result shape as HLO writes it
    groups: tuple[tuple[int, ...], ...]  # partition ids communicating (pairs for a permute)
    all_devices: bool = False  # replica_groups={}: one group of every partition
    async_start: bool = False  # an `-start` op, whose result tuple holds input and output
    dcn: bool = False  # a MegaScale (data-center network) transfer of a multi-slice program

    @property
    def bytes(self) -> int:
        """Bytes of the result (an async gather's or permute's start counts its output,
        not the input it also holds)."""
        arrays = [(d, [int(n) for n in dims.split(",") if n])
                  for d, dims in _ARRAY.findall(self.shape) if d in _DTYPE_BYTES]
        if self.async_start and self.kind in ("all-gather", "collective-permute"):
            arrays = arrays[len(arrays) // 2:] if self.kind == "all-gather" else arrays[1:2]
        return sum(_DTYPE_BYTES[d] * math.prod(dims) for d, dims in arrays)

    def spans(self, coord: np.ndarray) -> bool:
        """Whether some group holds partitions with different `coord` (a value per
        partition id, e.g. its slice index or its position along one mesh axis)."""
        if self.dcn:
            return True
        if self.all_devices:
            return len(set(coord.tolist())) > 1
        return any(len({int(coord[i]) for i in g}) > 1 for g in self.groups)


def _iota_groups(text: str) -> tuple[tuple[int, ...], ...]:
    """`[G,S]<=[d0,d1,...]T(p...)`: iota over d, transposed by p, reshaped to G groups of S."""
    m = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if not m:
        raise ValueError(f"unreadable replica groups {text!r}")
    out = [int(n) for n in m.group(1).split(",")]
    dims = [int(n) for n in m.group(2).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(3):
        ids = ids.transpose([int(n) for n in m.group(3).split(",")])
    ids = ids.reshape(out[0], -1) if len(out) > 1 else ids.reshape(1, -1)
    return tuple(tuple(int(i) for i in row) for row in ids)


def _braced_groups(text: str) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(n) for n in g.split(",") if n.strip())
                 for g in re.findall(r"\{([\d,\s]*)\}", text))


def _groups(line: str) -> tuple[tuple[tuple[int, ...], ...], bool]:
    m = re.search(r"source_target_pairs=(\{(?:\{[\d,\s]*\},?)*\})", line)
    if m:
        return _braced_groups(m.group(1)[1:-1]), False
    m = re.search(r"replica_groups=(\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)", line)
    if m:
        return _iota_groups(m.group(1)), False
    m = re.search(r"replica_groups=\{((?:\{[\d,\s]*\},?)*)\}", line)
    if m:
        groups = _braced_groups(m.group(1))
        return groups, not groups
    return (), True  # no groups named: every partition


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective instruction of the HLO module (async pairs counted once, by start)."""
    out, seen = [], set()
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            dcn = _megascale_send(line)
            if dcn is not None and dcn.name not in seen:
                seen.add(dcn.name)
                out.append(dcn)
            continue
        groups, everyone = _groups(line)
        out.append(Collective(name=m.group("name"), kind=m.group("kind"),
                              shape=m.group("shape"), groups=groups, all_devices=everyone,
                              async_start=bool(m.group("start"))))
    return out


def _megascale_send(line: str) -> Collective | None:
    """A host-transfer `send` to the MegaScale runtime: the DCN leg of a collective."""
    if "_xla_megascale_transfer_type=" not in line:
        return None
    m = _SEND.match(line)
    kind = re.search(r'_xla_megascale_transfer_type="(\w+)"', line)
    if not m or not kind:
        return None
    name = re.search(r'_xla_host_transfer_rendezvous="([^"]+)"', line)
    array = _ARRAY.search(m.group("shape"))
    return Collective(name=name.group(1) if name else m.group("name"),
                      kind=kind.group(1).lower().replace("_", "-"),
                      shape=f"{array.group(1)}[{array.group(2)}]" if array else "",
                      groups=(), dcn=True)


def axis_coordinates(mesh, axis: str) -> np.ndarray:
    """Per partition id (flattened mesh position), its index along mesh axis `axis`."""
    shape = mesh.devices.shape
    if axis not in mesh.axis_names:
        return np.zeros(math.prod(shape), np.int64)
    return np.indices(shape)[list(mesh.axis_names).index(axis)].reshape(-1)


def slice_coordinates(mesh, axis: str = "slices") -> np.ndarray:
    """Per partition id, the slice its device is in: the device's own `slice_index` (TPU
    multi-slice), else its position along the mesh's `axis` (pseudo-slices on CPU)."""
    flat = mesh.devices.reshape(-1)
    if all(getattr(d, "slice_index", None) is not None for d in flat):
        ids = np.array([int(d.slice_index) for d in flat])
        if len(set(ids.tolist())) > 1:
            return ids
    return axis_coordinates(mesh, axis)


def crossing(found: Sequence[Collective], coord: np.ndarray) -> list[Collective]:
    """The collectives whose groups span more than one value of `coord`."""
    return [c for c in found if c.spans(coord)]


def summarize(found: Sequence[Collective]) -> dict[str, dict[str, int]]:
    """{kind: {'count': n, 'bytes': result bytes summed}} (per device, per execution of
    the instruction: a collective inside a loop body runs once per iteration)."""
    out: dict[str, dict[str, int]] = {}
    for c in found:
        entry = out.setdefault(c.kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += c.bytes
    return out
