"""Transformer building blocks shared by the image and text towers.

Attention and MLP projections are einsums over explicit N-D kernels made with
`self.param` (not `nn.DenseGeneral(features=(heads, head_dim))`, which breaks
under a mesh once wrapped in logical partitioning, Flax #3676). Every param
carries logical axis names; activations between blocks are constrained to
('batch', 'length', 'embed'). The numerics follow open_clip's
`ResidualAttentionBlock` (pre-LN, LayerNorm eps 1e-5, fused in-projection).

Two kernel paths compute the same numbers (`model.kernels`):

- `cpu`: projections through a custom VJP whose weight gradient contracts the
  token axis in place, and head-major attention: what XLA:CPU runs fastest;
- `xla`: autodiff projections and `jax.nn.dot_product_attention` (cuDNN's fused
  attention on GPU where it applies, XLA's own on TPU): what accelerators want;
- `auto` (default): `cpu` when the program is compiled for CPU, else `xla`. The
  target is the default backend, or the platform `target_platform()` names
  (`clipjax compile` lowers for TPU on a CPU host).

The `xla` path never merges the `heads` axis of a kernel with another axis (the
N-D kernels enter `dot_general` whole); the `cpu` path reshapes attention
kernels to 2-D only while the mesh and rules leave `heads` unsplit. Tensor
parallelism over `heads` / `mlp` therefore keeps every weight sharded on both
paths: no all-gather of attention or MLP weights.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

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


KERNELS = ("auto", "cpu", "xla")
_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "clipjax_target_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str | None) -> Iterator[None]:
    """Within it, `kernels='auto'` resolves for `platform` ('cpu', 'gpu', 'tpu') instead of
    the default backend: for programs lowered for devices other than this host's."""
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def compile_platform() -> str:
    """The platform programs built now are compiled for."""
    platform = _TARGET_PLATFORM.get()
    if platform is None:
        platform = jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def resolve_kernels(kernels: str, platform: str | None = None) -> str:
    """'auto' -> 'cpu' on CPU, 'xla' elsewhere; 'cpu' / 'xla' as given."""
    if kernels not in KERNELS:
        raise ClipjaxError(f"unknown model.kernels {kernels!r}; choose from {', '.join(KERNELS)}")
    if kernels != "auto":
        return kernels
    return "cpu" if (platform or compile_platform()) == "cpu" else "xla"


def _dims(n: int, start: int = 0) -> tuple[int, ...]:
    return tuple(range(start, start + n))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _contract(x, w, n: int):
    """x[T, *in] . w[*in, *out] -> [T, *out], `in` being n axes."""
    return lax.dot_general(x, w, ((_dims(n, 1), _dims(n)), ((), ())))


def _contract_fwd(x, w, n):
    # The dot itself, not a call of `_contract`: remat policies (`model.remat=dots...`)
    # then see a dot_general whose output they may save.
    return lax.dot_general(x, w, ((_dims(n, 1), _dims(n)), ((), ()))), (x, w)


def _contract_bwd(n, res, dy):
    x, w = res
    out = w.ndim - n
    dx = lax.dot_general(dy, w, ((_dims(out, 1), _dims(out, n)), ((), ())))
    # The weight gradient contracts the token axis of both operands in place: autodiff's
    # own rule yields dy^T x, which XLA:CPU feeds through a transposed copy of dy.
    dw = lax.dot_general(x, dy, (((0,), (0,)), ((), ())))
    return dx, dw


_contract.defvjp(_contract_fwd, _contract_bwd)


def axis_is_sharded(logical_name: str) -> bool:
    """Whether the current mesh and logical-axis rules split `logical_name` over >1 device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return False
    entry = nn.logical_to_mesh_axes((logical_name,))[0]
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(mesh.shape.get(a, 1) for a in axes) > 1


def linear(x, kernel, in_dims: int = 1, kernels: str = "auto", merge: bool = True):
    """x[..., *in] @ kernel[*in, *out], `in` being the kernel's first `in_dims` axes.

    `cpu`: one matmul over all tokens, whose custom VJP keeps the backward free of the
    activation transposes autodiff adds on XLA:CPU. The kernel is reshaped to 2-D (fastest
    on XLA:CPU), unless `merge=False`: then it enters whole, N-D, which a kernel whose axes
    are sharded needs (a reshape merging a sharded axis costs an all-gather).
    `xla`: `dot_general` over the N-D operands as written, autodiff's backward.
    """
    lead = x.shape[:x.ndim - in_dims]
    if resolve_kernels(kernels) == "xla":
        return lax.dot_general(x, kernel, ((_dims(in_dims, len(lead)), _dims(in_dims)),
                                           ((), ())))
    if merge:
        k = math.prod(kernel.shape[:in_dims])
        y = _contract(x.reshape(-1, k), kernel.reshape(k, -1), 1)
    else:
        y = _contract(x.reshape(-1, *x.shape[len(lead):]), kernel, in_dims)
    return y.reshape(*lead, *kernel.shape[in_dims:])


def _cudnn_ok(q) -> bool:
    return compile_platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)


def attention(q, k, v, causal: bool = False, query_index=None, kernels: str = "auto"):
    """Softmax attention of [B, Lq, H, D] queries over [B, L, H, D] keys/values.

    `query_index` [B] gives each query's position when Lq=1 (the causal mask then hides
    the keys after it). Logits and softmax in float32 on either path.

    `cpu`: computed head-major ([B, H, L, D]): on XLA:CPU forward + backward run ~1.4x
    faster than in the token-major layout of `jax.nn.dot_product_attention`.
    `xla`: `jax.nn.dot_product_attention`, with cuDNN's fused kernel on GPU for bf16/fp16
    shapes it takes (XLA's own implementation otherwise, and on TPU).
    """
    if resolve_kernels(kernels) == "xla":
        kw = {}
        if causal and query_index is not None:
            kw["key_value_seq_lengths"] = (query_index + 1).astype(jnp.int32)
        else:
            kw["is_causal"] = causal
        if _cudnn_ok(q):
            try:
                return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kw)
            except Exception:  # a shape, dtype or GPU cuDNN does not take: XLA's own
                pass
        return jax.nn.dot_product_attention(q, k, v, **kw)
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * q.shape[-1] ** -0.5
    if causal:
        keys = jnp.arange(k.shape[2])
        if query_index is None:
            mask = keys[None, :] <= jnp.arange(q.shape[2])[:, None]
        else:
            mask = (keys[None, :] <= query_index[:, None])[:, None, None, :]
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    y = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
    return jnp.swapaxes(y, 1, 2)


def take_tokens(x, index):
    """[B, L, W] -> [B, 1, W]: each sequence's token at `index` [B]."""
    return jnp.take_along_axis(x, index[:, None, None], axis=1)


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
    kernels: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, query_index=None):
        """Full self-attention, or with `query_index` [B] only the query at that position
        of each sequence (keys and values still come from every token): [B, 1, W]."""
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
        # [B, L, 3, heads, kv]: the heads axis stays its own axis from kernel to output
        # (the CPU path's 2-D reshape only while heads are not split over devices).
        ops = dict(kernels=resolve_kernels(self.kernels), merge=not axis_is_sharded("heads"))
        kernel, bias = qkv_kernel.astype(self.dtype), qkv_bias.astype(self.dtype)
        if query_index is None:
            q, k, v = jnp.moveaxis(linear(x, kernel, **ops) + bias, 2, 0)
        else:
            q = linear(take_tokens(x, query_index), kernel[:, 0], **ops) + bias[0]
            k, v = jnp.moveaxis(linear(x, kernel[:, 1:], **ops) + bias[1:], 2, 0)
        y = attention(q, k, v, causal=self.causal, query_index=query_index,
                      kernels=ops["kernels"])
        y = linear(y, out_kernel.astype(self.dtype), in_dims=2, **ops)
        return y + out_bias.astype(self.dtype)


class Mlp(nn.Module):
    """c_fc -> activation -> c_proj, as in OpenAI's residual block."""

    width: int
    hidden: int
    act: str = "quick_gelu"
    fc_std: float | None = None
    proj_std: float | None = None
    kernels: str = "auto"
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
        kernels = resolve_kernels(self.kernels)
        h = activation(self.act)(linear(x, fc_kernel.astype(self.dtype), kernels=kernels)
                                 + fc_bias.astype(self.dtype))
        y = linear(h, proj_kernel.astype(self.dtype), kernels=kernels)
        return y + proj_bias.astype(self.dtype)


class ResidualBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x)). Scan-compatible signature."""

    width: int
    heads: int
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    causal: bool = False
    depth: int = 12  # the stack's depth, for the output-projection init scale
    kernels: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, _=None, query_index=None):
        """[B, L, W] -> [B, L, W]; with `query_index` [B], only that token of each sequence
        goes on through the block: [B, 1, W] (what a tower's last block needs to pool)."""
        proj_std = self.width ** -0.5 * (2 * self.depth) ** -0.5
        hidden = int(self.width * self.mlp_ratio)  # open_clip's int() truncation
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ops = dict(kernels=self.kernels, **kw)
        y = layer_norm(name="ln_1", **kw)(x)
        if query_index is not None:
            x = take_tokens(x, query_index)
        x = x + SelfAttention(self.width, self.heads, self.causal, out_std=proj_std,
                              name="attn", **ops)(y, query_index)
        x = constrain(x)
        y = layer_norm(name="ln_2", **kw)(x)
        x = x + Mlp(self.width, hidden, self.act, proj_std=proj_std, name="mlp", **ops)(y)
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
    # Scanned: the last block on the pooled tokens only (below). Without gradient
    # accumulation that is the cheaper program; inside `train.grad_accum`'s loop XLA's TPU
    # compiler keeps more live with it than with the full scan (ViT-L/14, v5p-128, 262k,
    # accum 8: 90.9 vs 76.7 GiB per chip), so the train step turns it off there.
    scan_pooled_last: bool = True
    remat: str = "none"
    kernels: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, pool_index=None):
        """[B, L, W] -> [B, L, W]; with `pool_index` [B], each sequence's token at that
        position: [B, 1, W]. The last block then computes only those tokens (its other
        outputs feed nothing): the same result, ~1/layers less work. Scanned, that is
        L-1 scanned layers over the stacked params [:L-1], then the last block unrolled
        over [L-1]: the param tree (one stacked `blocks`) is the full stack's."""
        policy = remat_policy(self.remat)

        def block(in_scan: bool):
            if policy is None:
                return ResidualBlock
            return nn.remat(ResidualBlock, policy=policy, prevent_cse=not in_scan)

        def stack(length: int):
            return nn.scan(
                block(True), variable_axes={"params": 0}, split_rngs={"params": True},
                length=length, metadata_params={nn.PARTITION_NAME: "layers"})

        kw = dict(width=self.width, heads=self.heads, mlp_ratio=self.mlp_ratio, act=self.act,
                  causal=self.causal, depth=self.layers, kernels=resolve_kernels(self.kernels),
                  dtype=self.dtype, param_dtype=self.param_dtype)
        if self.scan:
            if (pool_index is None or self.is_initializing() or not self.layers
                    or not self.scan_pooled_last):
                x, _ = stack(self.layers)(**kw, name="blocks")(x, None)
                return x if pool_index is None else take_tokens(x, pool_index)
            return self._scanned_then_pooled(x, pool_index, kw)
        if not self.layers and pool_index is not None:
            return take_tokens(x, pool_index)
        for i in range(self.layers):
            last = i == self.layers - 1 and pool_index is not None
            x, _ = block(self.scan)(**kw, name=f"blocks_{i}")(x, None, pool_index if last else None)
        return x

    def _scanned_then_pooled(self, x, pool_index, kw):
        """The stacked `blocks` params applied as L-1 scanned layers + the pooled last one.

        Each step indexes its layer out of the whole stack inside the rematerialised
        region, so the backward pass keeps no per-layer copy of the params."""
        params = nn.meta.unbox(self.variables["params"]["blocks"])
        n, policy = self.layers, remat_policy(self.remat)
        block = ResidualBlock(**kw, parent=None)

        def run(h, i, stack, index=None):
            p = jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), stack)
            return block.apply({"params": p}, h, None, index)[0]

        scanned, last = run, run
        if policy is not None:
            scanned = jax.checkpoint(run, policy=policy, prevent_cse=False)
            last = jax.checkpoint(run, policy=policy)
        if n > 1:
            x, _ = lax.scan(lambda h, i: (scanned(h, i, params), None), x, jnp.arange(n - 1))
        return last(x, n - 1, params, pool_index)
