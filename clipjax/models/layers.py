"""Transformer building blocks shared by the image and text towers.

Attention and MLP projections are einsums over explicit N-D kernels made with
`self.param` (not `nn.DenseGeneral(features=(heads, head_dim))`, which breaks
under a mesh once wrapped in logical partitioning, Flax #3676). Every param
carries logical axis names; activations between blocks are constrained to
('batch', 'length', 'embed'). The numerics follow open_clip's
`ResidualAttentionBlock` (pre-LN, LayerNorm eps 1e-5, fused in-projection).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.errors import ClipjaxError

LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which OpenAI's weights were trained with
ACTIVATION_AXES = ("batch", "length", "embed")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
    """A dtype from its config spelling ('float32', 'bfloat16', 'float16')."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ClipjaxError(f"unknown dtype {name!r}; choose from {', '.join(_DTYPES)}") from None


def quick_gelu(x):
    """OpenAI's GELU approximation, x * sigmoid(1.702 x): what their weights expect."""
    return x * jax.nn.sigmoid(1.702 * x)


def activation(name: str) -> Callable:
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return functools.partial(jax.nn.gelu, approximate=False)  # torch.nn.GELU()
    raise ClipjaxError(f"unknown activation {name!r}; choose from quick_gelu, gelu")


def remat_policy(name: str):
    """The jax.checkpoint policy for `model.remat`; None means no rematerialisation."""
    policies = {
        "none": None,
        "full": jax.checkpoint_policies.nothing_saveable,
        "save_nothing": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }
    if name not in policies:
        raise ClipjaxError(f"unknown remat policy {name!r}; choose from {', '.join(policies)}")
    return policies[name]


def constrain(x):
    """Logical sharding constraint on a [batch, length, embed] activation."""
    return nn.with_logical_constraint(x, ACTIVATION_AXES)


def logical(init: Callable, axes: Sequence[str | None]) -> Callable:
    return nn.with_logical_partitioning(init, tuple(axes))


def normal(std: float) -> Callable:
    return jax.nn.initializers.normal(stddev=std)


zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


def layer_norm(dtype, param_dtype, axis_name: str = "embed", name: str | None = None):
    """torch-compatible LayerNorm (eps 1e-5, two-pass variance) with logical names."""
    return nn.LayerNorm(
        epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
        scale_init=logical(ones, (axis_name,)), bias_init=logical(zeros, (axis_name,)),
        name=name)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused [embed, 3, heads, kv] in-projection."""

    width: int
    heads: int
    causal: bool = False
    attn_std: float | None = None  # None = width ** -0.5
    out_std: float | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        head_dim = self.width // self.heads
        attn_std = self.attn_std or self.width ** -0.5
        out_std = self.out_std or self.width ** -0.5
        qkv_kernel = self.param(
            "qkv_kernel", logical(normal(attn_std), ("embed", None, "heads", "kv")),
            (self.width, 3, self.heads, head_dim), self.param_dtype)
        qkv_bias = self.param(
            "qkv_bias", logical(zeros, (None, "heads", "kv")),
            (3, self.heads, head_dim), self.param_dtype)
        out_kernel = self.param(
            "out_kernel", logical(normal(out_std), ("heads", "kv", "embed")),
            (self.heads, head_dim, self.width), self.param_dtype)
        out_bias = self.param("out_bias", logical(zeros, ("embed",)), (self.width,),
                              self.param_dtype)
        x = x.astype(self.dtype)
        qkv = jnp.einsum("blw,wthd->tblhd", x, qkv_kernel.astype(self.dtype))
        qkv = qkv + qkv_bias.astype(self.dtype)[:, None, None]
        y = jax.nn.dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=self.causal)
        y = jnp.einsum("blhd,hdw->blw", y, out_kernel.astype(self.dtype))
        return y + out_bias.astype(self.dtype)


class Mlp(nn.Module):
    """c_fc -> activation -> c_proj, as in OpenAI's residual block."""

    width: int
    hidden: int
    act: str = "quick_gelu"
    fc_std: float | None = None
    proj_std: float | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        fc_std = self.fc_std or (2 * self.width) ** -0.5
        proj_std = self.proj_std or self.hidden ** -0.5
        fc_kernel = self.param("fc_kernel", logical(normal(fc_std), ("embed", "mlp")),
                               (self.width, self.hidden), self.param_dtype)
        fc_bias = self.param("fc_bias", logical(zeros, ("mlp",)), (self.hidden,),
                             self.param_dtype)
        proj_kernel = self.param("proj_kernel", logical(normal(proj_std), ("mlp", "embed")),
                                 (self.hidden, self.width), self.param_dtype)
        proj_bias = self.param("proj_bias", logical(zeros, ("embed",)), (self.width,),
                               self.param_dtype)
        x = x.astype(self.dtype)
        h = jnp.einsum("blw,wm->blm", x, fc_kernel.astype(self.dtype))
        h = activation(self.act)(h + fc_bias.astype(self.dtype))
        y = jnp.einsum("blm,mw->blw", h, proj_kernel.astype(self.dtype))
        return y + proj_bias.astype(self.dtype)


class ResidualBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x)). Scan-compatible signature."""

    width: int
    heads: int
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    causal: bool = False
    depth: int = 12  # the stack's depth, for the output-projection init scale
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, _=None):
        proj_std = self.width ** -0.5 * (2 * self.depth) ** -0.5
        hidden = int(self.width * self.mlp_ratio)  # open_clip's int() truncation
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = layer_norm(name="ln_1", **kw)(x)
        x = x + SelfAttention(self.width, self.heads, self.causal, out_std=proj_std,
                              name="attn", **kw)(y)
        x = constrain(x)
        y = layer_norm(name="ln_2", **kw)(x)
        x = x + Mlp(self.width, hidden, self.act, proj_std=proj_std, name="mlp", **kw)(y)
        return constrain(x), None


class Transformer(nn.Module):
    """A stack of residual blocks: unrolled (`blocks_0`, `blocks_1`, ...) or scanned
    (`blocks`, every param with a leading 'layers' axis), optionally rematerialised."""

    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    causal: bool = False
    scan: bool = False
    remat: str = "none"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        block = ResidualBlock
        policy = remat_policy(self.remat)
        if policy is not None:
            block = nn.remat(block, policy=policy, prevent_cse=not self.scan)
        kw = dict(width=self.width, heads=self.heads, mlp_ratio=self.mlp_ratio, act=self.act,
                  causal=self.causal, depth=self.layers, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        if self.scan:
            stack = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                length=self.layers, metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(**kw, name="blocks")(x, None)
            return x
        for i in range(self.layers):
            x, _ = block(**kw, name=f"blocks_{i}")(x, None)
        return x
