"""CLIP models in flax linen: ViT and ModifiedResNet image towers, the text
transformer, and the two-tower `Clip`, all built from `config.model`."""

from clipjax.models.clip import (
    INIT_COMPILER_OPTIONS,
    Clip,
    abstract_params,
    build_model,
    dummy_inputs,
    init_boxed,
    init_params,
    l2_normalize,
    logical_axes,
)
from clipjax.models.layers import KERNELS, compile_platform, resolve_kernels, target_platform
from clipjax.models.scan import is_scanned, stack_layers, unstack_layers

__all__ = [
    "INIT_COMPILER_OPTIONS", "KERNELS", "Clip", "abstract_params", "build_model",
    "compile_platform", "dummy_inputs", "init_boxed", "init_params", "is_scanned",
    "l2_normalize", "logical_axes", "resolve_kernels", "stack_layers", "target_platform",
    "unstack_layers",
]
