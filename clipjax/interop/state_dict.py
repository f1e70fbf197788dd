"""The mapping between clipjax params and OpenAI / open_clip state_dicts, both ways.

OpenAI's CLIP state_dict and open_clip's `CLIP.state_dict()` share one layout
(open_clip's `CustomTextCLIP` only prefixes the text tower with `text.`, which
`normalize` strips). Each param is described by a `Rule`: the state-dict keys it
comes from and the two conversions. Import is strict: a missing, unexpected or
mis-shaped key is a `ClipjaxError` naming the key, so a checkpoint of another
architecture is caught at its first differing tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from ml_collections import ConfigDict

from clipjax.errors import ClipjaxError
from clipjax.models import posembed

# Keys that carry no weights: OpenAI's metadata, BN counters, buffers.
IGNORED_SUFFIXES = ("num_batches_tracked",)
IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


@dataclass(frozen=True)
class Rule:
    path: tuple[str, ...]  # where the param sits in the clipjax tree
    keys: tuple[str, ...]  # the state-dict tensors it is made from
    to_param: Callable[..., np.ndarray]  # tensors (numpy) -> param
    to_torch: Callable[[Any], tuple]  # param -> tensors; array methods only (eval_shape-able)


def _p(path: str) -> tuple[str, ...]:
    return tuple(path.split("/"))


def _same(path, key):
    return Rule(_p(path), (key,), lambda t: t, lambda p: (p,))


def _transposed(path, key):
    return Rule(_p(path), (key,), lambda t: t.T, lambda p: (p.T,))


def _layer_norm(path, key):
    return [_same(f"{path}/scale", f"{key}.weight"), _same(f"{path}/bias", f"{key}.bias")]


def _conv(path, key):
    # torch [out, in, kh, kw] <-> flax [kh, kw, in, out]
    return Rule(_p(f"{path}/kernel"), (f"{key}.weight",), lambda t: t.transpose(2, 3, 1, 0),
                lambda p: (p.transpose(3, 2, 0, 1),))


def _batch_norm(path, key):
    return [_same(f"{path}/{ours}", f"{key}.{theirs}") for ours, theirs in (
        ("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var"))]


def _block(path, key, width, heads):
    hd = width // heads

    def qkv_kernel(t):  # torch in_proj [3W(t,h,d), W] -> [W, 3, H, D]
        return t.reshape(3, heads, hd, width).transpose(3, 0, 1, 2)

    def out_kernel(t):  # torch out_proj [W_out, W_in(h,d)] -> [H, D, W_out]
        return t.T.reshape(heads, hd, width)

    return [
        *_layer_norm(f"{path}/ln_1", f"{key}.ln_1"),
        Rule(_p(f"{path}/attn/qkv_kernel"), (f"{key}.attn.in_proj_weight",), qkv_kernel,
             lambda p: (p.transpose(1, 2, 3, 0).reshape(3 * width, width),)),
        Rule(_p(f"{path}/attn/qkv_bias"), (f"{key}.attn.in_proj_bias",),
             lambda t: t.reshape(3, heads, hd), lambda p: (p.reshape(3 * width),)),
        Rule(_p(f"{path}/attn/out_kernel"), (f"{key}.attn.out_proj.weight",), out_kernel,
             lambda p: (p.reshape(width, width).T,)),
        _same(f"{path}/attn/out_bias", f"{key}.attn.out_proj.bias"),
        *_layer_norm(f"{path}/ln_2", f"{key}.ln_2"),
        _transposed(f"{path}/mlp/fc_kernel", f"{key}.mlp.c_fc.weight"),
        _same(f"{path}/mlp/fc_bias", f"{key}.mlp.c_fc.bias"),
        _transposed(f"{path}/mlp/proj_kernel", f"{key}.mlp.c_proj.weight"),
        _same(f"{path}/mlp/proj_bias", f"{key}.mlp.c_proj.bias"),
    ]


def _transformer(path, key, width, heads, layers):
    rules = []
    for i in range(layers):
        rules += _block(f"{path}/blocks_{i}", f"{key}.resblocks.{i}", width, heads)
    return rules


def _vit_rules(img: ConfigDict) -> list[Rule]:
    p, w = img.patch_size, img.width
    return [
        # torch conv [W, 3, p, p] <-> [p*p*3 (y, x, c), W]
        Rule(_p("image/patch_kernel"), ("visual.conv1.weight",),
             lambda t: t.transpose(2, 3, 1, 0).reshape(p * p * 3, w),
             lambda k: (k.reshape(p, p, 3, w).transpose(3, 2, 0, 1),)),
        _same("image/class_embedding", "visual.class_embedding"),
        _same("image/positional_embedding", "visual.positional_embedding"),
        *_layer_norm("image/ln_pre", "visual.ln_pre"),
        *_transformer("image/transformer", "visual.transformer", w, img.heads, img.layers),
        *_layer_norm("image/ln_post", "visual.ln_post"),
        _same("image/proj", "visual.proj"),
    ]


def _attnpool_rules(width, heads):
    hd = width // heads
    qkv = ("q_proj", "k_proj", "v_proj")
    key = "visual.attnpool"

    def kernel(q, k, v):  # three torch [C_out, C_in] -> [C_in, 3, H, D]
        return np.stack([t.T for t in (q, k, v)], axis=1).reshape(width, 3, heads, hd)

    def bias(q, k, v):
        return np.stack([q, k, v]).reshape(3, heads, hd)

    def out_kernel(t):  # [E, C(h,d)] -> [H, D, E]
        return t.T.reshape(heads, hd, t.shape[0])

    return [
        _same("image/attnpool/positional_embedding", f"{key}.positional_embedding"),
        Rule(_p("image/attnpool/qkv_kernel"), tuple(f"{key}.{n}.weight" for n in qkv), kernel,
             lambda p: tuple(p[:, i].reshape(width, width).T for i in range(3))),
        Rule(_p("image/attnpool/qkv_bias"), tuple(f"{key}.{n}.bias" for n in qkv), bias,
             lambda p: tuple(p[i].reshape(width) for i in range(3))),
        Rule(_p("image/attnpool/out_kernel"), (f"{key}.c_proj.weight",), out_kernel,
             lambda p: (p.reshape(width, p.shape[-1]).T,)),
        _same("image/attnpool/out_bias", f"{key}.c_proj.bias"),
    ]


def _resnet_rules(img: ConfigDict) -> list[Rule]:
    rules = []
    for i in (1, 2, 3):
        rules += [_conv(f"image/conv{i}", f"visual.conv{i}"),
                  *_batch_norm(f"image/bn{i}", f"visual.bn{i}")]
    inplanes = img.resnet_width
    for stage, blocks in enumerate(img.resnet_layers):
        planes = img.resnet_width * 2 ** stage
        for j in range(int(blocks)):
            ours, theirs = f"image/layer{stage + 1}_{j}", f"visual.layer{stage + 1}.{j}"
            for k in (1, 2, 3):
                rules += [_conv(f"{ours}/conv{k}", f"{theirs}.conv{k}"),
                          *_batch_norm(f"{ours}/bn{k}", f"{theirs}.bn{k}")]
            stride = 2 if stage > 0 and j == 0 else 1
            if stride > 1 or inplanes != planes * 4:
                rules += [_conv(f"{ours}/downsample_conv", f"{theirs}.downsample.0"),
                          *_batch_norm(f"{ours}/downsample_bn", f"{theirs}.downsample.1")]
            inplanes = planes * 4
    return rules + _attnpool_rules(img.resnet_width * 32, img.resnet_heads)


def rules(model_cfg: ConfigDict) -> list[Rule]:
    """Every param of `config.model`'s Clip (unrolled layout) with its state-dict source."""
    img, txt = model_cfg.image, model_cfg.text
    out = _resnet_rules(img) if img.kind == "resnet" else _vit_rules(img)
    out += [
        _same("text/token_embedding", "token_embedding.weight"),
        _same("text/positional_embedding", "positional_embedding"),
        *_transformer("text/transformer", "transformer", txt.width, txt.heads, txt.layers),
        *_layer_norm("text/ln_final", "ln_final"),
        _same("text/text_projection", "text_projection"),
        Rule(("logit_scale",), ("logit_scale",), lambda t: t.reshape(()), lambda p: (p,)),
    ]
    if model_cfg.use_logit_bias:
        out.append(Rule(("logit_bias",), ("logit_bias",), lambda t: t.reshape(()),
                        lambda p: (p,)))
    return out


# ------------------------------------------------------------------------- key layout


def normalize(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Unwraps training checkpoints ({'state_dict': ...}), DDP's `module.`, torch.compile's
    `_orig_mod.` and open_clip's custom-text `text.` prefix into the OpenAI layout."""
    sd = state_dict
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    out = {}
    for key, value in sd.items():
        k = str(key)
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        k = k.removeprefix("text.")
        out[k] = value
    return out


def _is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.endswith(IGNORED_SUFFIXES)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _get(tree, path: tuple[str, ...]):
    for part in path:
        tree = tree[part]
    return tree


def _unrolled(model_cfg: ConfigDict) -> ConfigDict:
    cfg = ConfigDict(model_cfg.to_dict())
    cfg.scan_layers = False
    cfg.remat = "none"
    return cfg


def from_state_dict(state_dict: Mapping[str, Any], model_cfg: ConfigDict,
                    resized: list[str] | None = None) -> dict:
    """clipjax params (numpy, param_dtype) from an OpenAI/open_clip state_dict; strict.

    Values may be numpy arrays or anything `np.asarray` takes. The result is in the
    scanned layout when `model_cfg.scan_layers` is set. Position embeddings of another
    image size or context length than `model_cfg`'s are resized as open_clip's
    `resize_pos_embed` does (what was resized is appended to `resized`); any other
    mismatch is an error naming the tensor.
    """
    from clipjax.models import abstract_params, stack_layers
    from clipjax.models.layers import dtype_of

    sd = normalize(state_dict)
    cfg = _unrolled(model_cfg)
    abstract = nn.meta.unbox(abstract_params(cfg))
    dtype = np.dtype(dtype_of(model_cfg.param_dtype))
    params: dict = {}
    used = set()
    resized = [] if resized is None else resized
    for rule in rules(cfg):
        target = _get(abstract, rule.path)
        expected = jax.eval_shape(rule.to_torch, jax.ShapeDtypeStruct(target.shape, np.float32))
        tensors = []
        for key, want in zip(rule.keys, expected):
            if key not in sd:
                raise ClipjaxError(
                    f"checkpoint has no {key!r} (the model config expects a tensor of shape "
                    f"{tuple(want.shape)}); is it a checkpoint of another architecture?")
            t = np.asarray(sd[key])
            where = "/".join(rule.path)
            if tuple(t.shape) != tuple(want.shape) and posembed.is_resizable(where):
                new = posembed.resize(where, t.astype(np.float32), tuple(want.shape))
                if new is not None:  # another image size / context length: resample
                    resized.append(posembed.describe(where, t.shape, want.shape))
                    t = new
            if tuple(t.shape) != tuple(want.shape) and not (
                    rule.path[-1].startswith("logit_") and t.size == 1):
                raise ClipjaxError(
                    f"checkpoint tensor {key!r} has shape {tuple(t.shape)}; the model config "
                    f"expects {tuple(want.shape)} (another architecture or size?)")
            tensors.append(t.astype(np.float32))
            used.add(key)
        value = np.array(rule.to_param(*tensors), dtype=dtype, order="C")  # 0-d stays 0-d
        _set(params, rule.path, value)
    unexpected = sorted(k for k in sd if k not in used and not _is_ignored(k))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ClipjaxError(
            f"checkpoint has unexpected tensor {unexpected[0]!r}{more}; the model config does "
            "not use it (another architecture or size?)")
    return stack_layers(params) if model_cfg.scan_layers else params


def to_state_dict(params: Any, model_cfg: ConfigDict, *,
                  batch_norm_counters: bool = True) -> dict[str, np.ndarray]:
    """The OpenAI/open_clip state_dict (float32 numpy) holding `params`; either layout.

    With `batch_norm_counters` a ResNet's BatchNorms get open_clip's
    `num_batches_tracked` entries, so `load_state_dict(strict=True)` accepts it.
    """
    from clipjax.models import is_scanned, unstack_layers

    params = unstack_layers(params) if is_scanned(params) else params
    out: dict[str, np.ndarray] = {}
    for rule in rules(_unrolled(model_cfg)):
        value = np.asarray(jax.device_get(_get(params, rule.path)), dtype=np.float32)
        for key, tensor in zip(rule.keys, rule.to_torch(value)):
            out[key] = np.array(tensor, order="C")
            if batch_norm_counters and key.endswith(".running_var"):
                out[key.removesuffix("running_var") + "num_batches_tracked"] = np.zeros(
                    (), np.int64)
    return out
