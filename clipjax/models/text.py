"""OpenAI's text transformer (open_clip `TextTransformer` as CLIP embeds it).

token + learned position embeddings -> causal pre-LN blocks -> the pooled token
(the last block computes only it) -> ln_final -> projection. Pooling 'argmax' takes the position
of the highest token id, which for CLIP's BPE is the end-of-text token.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from clipjax.errors import ClipjaxError
from clipjax.models.layers import Transformer, constrain, layer_norm, logical, normal


def pool_index(tokens, pool: str):
    """[B, L] token ids -> [B]: the position whose features embed each sequence."""
    if pool == "first":
        return jnp.zeros(tokens.shape[0], jnp.int32)
    if pool == "last":
        return jnp.full(tokens.shape[0], tokens.shape[-1] - 1, jnp.int32)
    return jnp.argmax(tokens, axis=-1).astype(jnp.int32)  # first maximum, as torch.argmax


class TextTransformer(nn.Module):
    context_length: int
    vocab_size: int
    width: int
    layers: int
    heads: int
    output_dim: int
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    pool: str = "argmax"
    scan: bool = False
    scan_pooled_last: bool = True  # see Transformer
    remat: str = "none"
    kernels: str = "auto"  # cpu | xla | auto (see clipjax.models.layers)
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        w = self.width
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        token_embedding = self.param(
            "token_embedding", logical(normal(0.02), ("vocab", "embed")),
            (self.vocab_size, w), self.param_dtype)
        positional = self.param(
            "positional_embedding", logical(normal(0.01), ("length", "embed")),
            (self.context_length, w), self.param_dtype)
        projection = self.param(
            "text_projection", logical(normal(w ** -0.5), ("embed", "joint")),
            (w, self.output_dim), self.param_dtype)

        length = tokens.shape[-1]
        if length > self.context_length:
            raise ClipjaxError(
                f"text of {length} tokens is longer than the context length "
                f"{self.context_length}")
        x = jnp.take(token_embedding, tokens, axis=0).astype(self.dtype)
        x = x + positional[:length].astype(self.dtype)
        x = constrain(x)
        x = Transformer(w, self.layers, self.heads, self.mlp_ratio, self.act, causal=True,
                        scan=self.scan, scan_pooled_last=self.scan_pooled_last,
                        remat=self.remat, kernels=self.kernels, name="transformer",
                        **kw)(x, pool_index(tokens, self.pool))
        pooled = layer_norm(name="ln_final", **kw)(x[:, 0])
        return pooled @ projection.astype(self.dtype)
