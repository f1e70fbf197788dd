"""OpenAI's ModifiedResNet image tower (RN50, RN101, RN50x4, x16, x64).

Differences from a torchvision ResNet, as in OpenAI CLIP: a 3-conv stem with
an average pool, anti-aliased strided blocks (avgpool before the stride-1
conv), and a multi-head attention pool over the final feature map in place of
global average pooling. Layout is NHWC.

BatchNorm runs on stored statistics (`mean`, `var` in the params, outside the
gradient): imported weights reproduce open_clip's eval-mode numbers exactly and
the params pytree stays the model's only state. Training updates the affine
scale and bias, not the statistics (open_clip's `freeze_bn_stats`).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.models.layers import logical, normal, ones, remat_policy, zeros
from clipjax.models.vit import check_image_shape

BN_EPS = 1e-5
EXPANSION = 4
_CONV_AXES = (None, None, "conv_in", "conv_out")


def _conv(features, kernel, stride=1, name=None, dtype=jnp.float32, param_dtype=jnp.float32):
    pad = (kernel - 1) // 2
    init = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # kaiming, as torchvision
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                   param_dtype=param_dtype, kernel_init=logical(init, _CONV_AXES), name=name)


def _avg_pool(x, size: int):
    return nn.avg_pool(x, (size, size), strides=(size, size)) if size > 1 else x


class FrozenBatchNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * scale + bias, with mean/var held fixed."""

    features: int
    zero_init: bool = False  # the last BN of a block starts at 0 (open_clip's init)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape, axes = (self.features,), ("conv_out",)
        scale = self.param("scale", logical(zeros if self.zero_init else ones, axes), shape,
                           self.param_dtype)
        bias = self.param("bias", logical(zeros, axes), shape, self.param_dtype)
        mean = self.param("mean", logical(zeros, axes), shape, self.param_dtype)
        var = self.param("var", logical(ones, axes), shape, self.param_dtype)
        mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
        mul = scale.astype(jnp.float32) * jax.lax.rsqrt(var.astype(jnp.float32) + BN_EPS)
        add = bias.astype(jnp.float32) - mean.astype(jnp.float32) * mul
        return x * mul.astype(self.dtype) + add.astype(self.dtype)


class Bottleneck(nn.Module):
    planes: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out_planes = self.planes * EXPANSION
        out = nn.relu(FrozenBatchNorm(self.planes, name="bn1", **kw)(
            _conv(self.planes, 1, name="conv1", **kw)(x)))
        out = nn.relu(FrozenBatchNorm(self.planes, name="bn2", **kw)(
            _conv(self.planes, 3, name="conv2", **kw)(out)))
        out = _avg_pool(out, self.stride)
        out = FrozenBatchNorm(out_planes, zero_init=True, name="bn3", **kw)(
            _conv(out_planes, 1, name="conv3", **kw)(out))
        if self.stride > 1 or x.shape[-1] != out_planes:
            identity = _avg_pool(x, self.stride)
            identity = _conv(out_planes, 1, name="downsample_conv", **kw)(identity)
            identity = FrozenBatchNorm(out_planes, name="downsample_bn", **kw)(identity)
        else:
            identity = x
        return nn.relu(out + identity)


class AttentionPool(nn.Module):
    """Attention of the mean token over [mean; HW tokens] + positions; returns that one
    token projected. Computing only the first query is exactly what open_clip keeps."""

    width: int
    heads: int
    output_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        n, h, w, c = x.shape
        head_dim = c // self.heads
        std = c ** -0.5
        positional = self.param("positional_embedding", logical(normal(std), ("length", "embed")),
                                (h * w + 1, c), self.param_dtype)
        qkv_kernel = self.param("qkv_kernel", logical(normal(std), ("embed", None, "heads", "kv")),
                                (c, 3, self.heads, head_dim), self.param_dtype)
        qkv_bias = self.param("qkv_bias", logical(zeros, (None, "heads", "kv")),
                              (3, self.heads, head_dim), self.param_dtype)
        out_kernel = self.param("out_kernel", logical(normal(std), ("heads", "kv", "joint")),
                                (self.heads, head_dim, self.output_dim), self.param_dtype)
        out_bias = self.param("out_bias", logical(zeros, ("joint",)), (self.output_dim,),
                              self.param_dtype)
        dt = self.dtype
        x = x.reshape(n, h * w, c).astype(dt)
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
        x = x + positional.astype(dt)
        kernel, bias = qkv_kernel.astype(dt), qkv_bias.astype(dt)
        q = jnp.einsum("bw,whd->bhd", x[:, 0], kernel[:, 0]) + bias[0]
        kv = jnp.einsum("blw,wthd->tblhd", x, kernel[:, 1:]) + bias[1:, None, None]
        y = jax.nn.dot_product_attention(q[:, None], kv[0], kv[1])[:, 0]
        return jnp.einsum("bhd,hdo->bo", y, out_kernel.astype(dt)) + out_bias.astype(dt)


class ModifiedResNet(nn.Module):
    layers: Sequence[int]
    output_dim: int
    heads: int
    image_size: int = 224
    width: int = 64
    remat: str = "none"  # checkpoint policy per bottleneck block
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        policy = remat_policy(self.remat)
        block = Bottleneck if policy is None else nn.remat(Bottleneck, policy=policy)
        w = self.width
        check_image_shape(images, self.image_size)
        x = images.astype(self.dtype)
        for i, (features, stride) in enumerate([(w // 2, 2), (w // 2, 1), (w, 1)], start=1):
            x = _conv(features, 3, stride, name=f"conv{i}", **kw)(x)
            x = nn.relu(FrozenBatchNorm(features, name=f"bn{i}", **kw)(x))
        x = _avg_pool(x, 2)
        for stage, blocks in enumerate(self.layers):
            planes = w * 2 ** stage
            for j in range(int(blocks)):
                stride = 2 if stage > 0 and j == 0 else 1
                x = block(planes, stride, name=f"layer{stage + 1}_{j}", **kw)(x)
        return AttentionPool(w * 32, self.heads, self.output_dim, name="attnpool", **kw)(x)
