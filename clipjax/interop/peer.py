"""Access to the reference peer (open-clip-torch) for parity tests and benchmarks.

torchvision 0.28 on the torch 2.13 CPU wheel fails to import until its two
custom ops are declared; this shim declares them once, before open_clip loads.
"""

from __future__ import annotations

import functools
import importlib.util


def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "open_clip"))


@functools.cache
def open_clip():
    import torch

    if not hasattr(torch.ops.torchvision, "nms"):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _KEEP.append(lib)
    import open_clip as module

    return module


_KEEP: list = []  # the Library object must outlive the import
