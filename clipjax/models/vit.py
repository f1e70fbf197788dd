"""OpenAI's Vision Transformer image tower (open_clip `VisionTransformer`, pool 'tok' or
'avg').

patches -> linear embed (conv without bias) -> [class token; patches] + learned
positions -> ln_pre -> pre-LN blocks -> ln_post on the class token (or on every token,
then the mean of the patch tokens) -> projection.
The patch embedding is a reshape plus one matmul against a [patch*patch*3, width]
kernel, the same arithmetic as the strided convolution, faster on CPU.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from clipjax.errors import ClipjaxError
from clipjax.models.layers import Transformer, constrain, layer_norm, linear, logical, normal


def check_image_shape(images, size: int) -> None:
    if images.ndim != 4 or tuple(images.shape[1:]) != (size, size, 3):
        raise ClipjaxError(
            f"images of shape {tuple(images.shape)}; the model takes [N, {size}, {size}, 3] "
            "(NHWC, preprocessed)")


def patchify(images, patch: int):
    """[N, S, S, C] -> [N, (S/p)^2, p*p*C], patches in row-major order, each (y, x, c)."""
    n, h, w, c = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(n, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, gh * gw, patch * patch * c)


class VisionTransformer(nn.Module):
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    output_dim: int
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    pool: str = "tok"  # tok: the class token; avg: the mean of the patch tokens
    scan: bool = False
    scan_pooled_last: bool = True  # see Transformer
    remat: str = "none"
    kernels: str = "auto"  # cpu | xla | auto (see clipjax.models.layers)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images, keep=None):
        """`keep` int [N, k] (optional): the patch indices each image keeps (FLIP patch
        dropout, training only); the class token is always kept. Positions are those of
        the kept patches, so the embeddings equal open_clip's PatchDropout after pos-emb."""
        p, w = self.patch_size, self.width
        grid = self.image_size // p
        scale = w ** -0.5
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        patch_kernel = self.param(
            "patch_kernel", logical(normal((3 * p * p) ** -0.5), ("patch", "embed")),
            (p * p * 3, w), self.param_dtype)
        class_embedding = self.param(
            "class_embedding", logical(normal(scale), ("embed",)), (w,), self.param_dtype)
        positional = self.param(
            "positional_embedding", logical(normal(scale), ("length", "embed")),
            (grid * grid + 1, w), self.param_dtype)
        proj = self.param("proj", logical(normal(scale), ("embed", "joint")),
                          (w, self.output_dim), self.param_dtype)

        check_image_shape(images, self.image_size)
        x = patchify(images.astype(self.dtype), p)
        pos = positional.astype(self.dtype)
        pos_patches = pos[None, 1:]
        if keep is not None:  # gather before the embedding: dropped patches cost nothing
            keep = keep.astype(jnp.int32)
            x = jnp.take_along_axis(x, keep[..., None], axis=1)
            pos_patches = jnp.take(pos[1:], keep, axis=0)
        x = linear(x, patch_kernel.astype(self.dtype), kernels=self.kernels) + pos_patches
        cls = jnp.broadcast_to((class_embedding.astype(self.dtype) + pos[0]),
                               (x.shape[0], 1, w))
        x = jnp.concatenate([cls, x], axis=1)
        x = constrain(x)
        x = layer_norm(name="ln_pre", **kw)(x)
        pool_index = None if self.pool == "avg" else jnp.zeros(x.shape[0], jnp.int32)
        x = Transformer(w, self.layers, self.heads, self.mlp_ratio, self.act, causal=False,
                        scan=self.scan, scan_pooled_last=self.scan_pooled_last,
                        remat=self.remat, kernels=self.kernels, name="transformer",
                        **kw)(x, pool_index)
        ln_post = layer_norm(name="ln_post", **kw)
        if self.pool == "avg":  # open_clip: ln_post on every token, then the patch mean
            pooled = ln_post(x)[:, 1:].mean(axis=1)
        else:
            pooled = ln_post(x[:, 0])
        return pooled @ proj.astype(self.dtype)
