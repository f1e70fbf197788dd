"""The two-tower CLIP module and its construction from `config.model`.

`Clip` holds an image tower ("image": ViT or ModifiedResNet), a text tower
("text"), the learnable log-temperature "logit_scale" and, for the sigmoid
loss, "logit_bias". Embeddings come out L2-normalised in float32 whatever the
compute dtype.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from clipjax.models.layers import dtype_of, logical, resolve_kernels
from clipjax.models.resnet import ModifiedResNet
from clipjax.models.text import TextTransformer
from clipjax.models.vit import VisionTransformer


def l2_normalize(x, eps: float = 1e-12):
    """x / max(||x||, eps) along the last axis, in float32 (torch's F.normalize)."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


class Clip(nn.Module):
    image: nn.Module  # submodule fields: their names are the param tree's top-level keys
    text: nn.Module
    logit_scale_init: float
    use_logit_bias: bool = False
    logit_bias_init: float = -10.0

    def setup(self):
        self.logit_scale = self.param(
            "logit_scale", logical(jax.nn.initializers.constant(self.logit_scale_init), ()),
            (), jnp.float32)
        if self.use_logit_bias:
            self.logit_bias = self.param(
                "logit_bias", logical(jax.nn.initializers.constant(self.logit_bias_init), ()),
                (), jnp.float32)

    def encode_image(self, images, normalize: bool = True, keep=None):
        """images: float [N, S, S, 3] NHWC, already normalised -> [N, embed_dim].
        `keep` int [N, k]: the ViT patches kept (patch dropout; training only)."""
        x = self.image(images) if keep is None else self.image(images, keep)
        return l2_normalize(x) if normalize else x.astype(jnp.float32)

    def encode_text(self, tokens, normalize: bool = True):
        """tokens: int [N, L] -> [N, embed_dim]."""
        x = self.text(tokens)
        return l2_normalize(x) if normalize else x.astype(jnp.float32)

    def __call__(self, images, tokens, keep=None) -> dict[str, Any]:
        return {
            "image_emb": self.encode_image(images, keep=keep),
            "text_emb": self.encode_text(tokens),
            "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias if self.use_logit_bias else None,
        }


def _tower_dtype(model_cfg: ConfigDict, tower: str):
    return dtype_of(model_cfg[tower].dtype or model_cfg.dtype)


def _kernels(model_cfg: ConfigDict) -> str:
    """`model.kernels` resolved for the platform programs are compiled for now ('auto' ->
    'cpu' or 'xla'; see `clipjax.models.layers.target_platform`)."""
    return resolve_kernels(model_cfg.get("kernels", "auto"))


def build_image_tower(model_cfg: ConfigDict, scan_pooled_last: bool = True) -> nn.Module:
    img = model_cfg.image
    kw = dict(dtype=_tower_dtype(model_cfg, "image"), param_dtype=dtype_of(model_cfg.param_dtype),
              parent=None)
    if img.kind == "resnet":
        return ModifiedResNet(
            layers=tuple(int(n) for n in img.resnet_layers), output_dim=model_cfg.embed_dim,
            heads=img.resnet_heads, image_size=img.image_size, width=img.resnet_width,
            remat=model_cfg.remat, **kw)
    return VisionTransformer(
        image_size=img.image_size, patch_size=img.patch_size, width=img.width,
        layers=img.layers, heads=img.heads, output_dim=model_cfg.embed_dim,
        mlp_ratio=float(img.mlp_ratio), act=model_cfg.act, pool=img.get("pool", "tok"),
        scan=model_cfg.scan_layers, scan_pooled_last=scan_pooled_last, remat=model_cfg.remat,
        kernels=_kernels(model_cfg), **kw)


def build_text_tower(model_cfg: ConfigDict, scan_pooled_last: bool = True) -> nn.Module:
    txt = model_cfg.text
    return TextTransformer(
        context_length=txt.context_length, vocab_size=txt.vocab_size, width=txt.width,
        layers=txt.layers, heads=txt.heads, output_dim=model_cfg.embed_dim,
        mlp_ratio=float(txt.mlp_ratio), act=model_cfg.act, pool=txt.pool,
        scan=model_cfg.scan_layers, scan_pooled_last=scan_pooled_last, remat=model_cfg.remat,
        kernels=_kernels(model_cfg), dtype=_tower_dtype(model_cfg, "text"),
        param_dtype=dtype_of(model_cfg.param_dtype), parent=None)


def build_model(model_cfg: ConfigDict, scan_pooled_last: bool = True) -> Clip:
    """The Clip module `config.model` describes (every hyper-parameter read from it).
    `scan_pooled_last=False`: scanned towers run every token through the last block
    (a program choice, same params and numbers: see `Transformer.scan_pooled_last`)."""
    return Clip(
        image=build_image_tower(model_cfg, scan_pooled_last),
        text=build_text_tower(model_cfg, scan_pooled_last),
        logit_scale_init=float(model_cfg.logit_scale_init),
        use_logit_bias=bool(model_cfg.use_logit_bias),
        logit_bias_init=float(model_cfg.logit_bias_init))


def dummy_inputs(model_cfg: ConfigDict, batch: int = 1):
    """Zero images and tokens of the shapes the model takes (for init and eval_shape)."""
    size = model_cfg.image.image_size
    images = jnp.zeros((batch, size, size, 3), jnp.float32)
    tokens = jnp.zeros((batch, model_cfg.text.context_length), jnp.int32)
    return images, tokens


def init_boxed(model_cfg: ConfigDict, rng) -> Any:
    """Params as flax creates them: LogicallyPartitioned boxes carrying axis names."""
    model = build_model(model_cfg)
    return model.init(rng, *dummy_inputs(model_cfg))["params"]


# Init runs once: XLA's backend optimisations cost far more compile time (tens of
# seconds for hundreds of small RNG fusions) than they save at run time.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def init_params(model_cfg: ConfigDict, rng, *, out_shardings: Any = None) -> Any:
    """Fresh params (plain arrays) for `config.model`, initialised under jit.

    `out_shardings` (a pytree of shardings like the params) makes them born sharded.
    """
    init = jax.jit(lambda key: nn.meta.unbox(init_boxed(model_cfg, key)),
                   out_shardings=out_shardings)
    return init.lower(rng).compile(compiler_options=INIT_COMPILER_OPTIONS)(rng)


def abstract_params(model_cfg: ConfigDict) -> Any:
    """The boxed params' shapes and dtypes (jax.ShapeDtypeStruct), without computing them."""
    return jax.eval_shape(lambda rng: init_boxed(model_cfg, rng), jax.random.key(0))


def logical_axes(model_cfg: ConfigDict) -> Any:
    """A pytree like the params holding each param's logical PartitionSpec."""
    return nn.get_partition_spec(abstract_params(model_cfg))
