"""Config validation: unknown keys (with a suggestion), wrong types and inconsistent
combinations are rejected before anything compiles, naming the key."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ml_collections import ConfigDict

from clipjax.config_defaults import default_config
from clipjax.errors import ConfigError

# --------------------------------------------------------------------------- validation

_CHOICES = {
    "model.act": ("quick_gelu", "gelu"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots", "dots_no_batch", "save_nothing"),
    "model.kernels": ("auto", "cpu", "xla"),
    "model.image.kind": ("vit", "resnet"),
    "model.image.dtype": ("", "float32", "bfloat16", "float16"),
    "model.image.interpolation": ("bicubic", "bilinear", "nearest"),
    "model.image.pool": ("tok", "avg"),
    "model.text.pool": ("argmax", "last", "first"),
    "model.text.dtype": ("", "float32", "bfloat16", "float16"),
    "model.tokenizer.kind": ("clip_bpe", "sentencepiece"),
    "data.train.source": ("synthetic", "webdataset", "tfds", "folder", "mixture"),
    "data.train.caption_choice": ("random", "first"),
    "loss.kind": ("softmax", "sigmoid"),
    "loss.impl": ("dense", "ring"),
    "loss.positives": ("index", "caption", "label"),
    "optim.name": ("adamw", "adafactor", "lion", "sgd"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "optim.warmup_init": ("zero", "one_step"),
    "train.nonfinite": ("skip", "stop"),
    "runtime.distributed": ("auto", "on", "off"),
    "eval.positives": ("index", "caption"),
}

_POSITIVE = (
    "model.embed_dim", "model.image.image_size", "model.image.patch_size", "model.image.width",
    "model.image.layers", "model.image.heads", "model.image.resnet_width",
    "model.image.resnet_heads", "model.text.context_length", "model.text.vocab_size",
    "model.text.width", "model.text.heads", "model.text.layers", "data.batch_size",
    "train.steps", "train.log_every", "train.ckpt_every", "train.keep", "train.grad_accum",
    "eval.batch_size",
    "eval.watch_timeout", "eval.poll_interval",
)
_NON_NEGATIVE = (
    "data.workers", "data.prefetch", "loss.chunk", "optim.lr", "optim.weight_decay",
    "optim.warmup_steps", "optim.clip_norm", "train.keep_every", "train.peak_flops",
    "train.eval_every",
    "eval.max_examples", "eval.linear_probe_max_train",
    "data.threads", "data.train.shuffle_window",
)

def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, ConfigDict | dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _type_ok(default, value) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, tuple | list):
        return isinstance(value, tuple | list)
    return isinstance(value, type(default))


def unknown_key(key: str) -> ConfigError:
    """'unknown config key config.K (did you mean config.X?)', X the closest known key."""
    import difflib

    known = list(_flatten(default_config()))
    sections = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    guesses = difflib.get_close_matches(key, known + sorted(sections), n=1, cutoff=0.6)
    if not guesses:  # the right leaf in the wrong section: config.lr -> config.optim.lr
        leaf = key.rsplit(".", 1)[-1]
        guesses = [k for k in known if k.rsplit(".", 1)[-1] == leaf][:1] or [
            k for k in known if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]],
                                                          cutoff=0.8)][:1]
    hint = f" (did you mean config.{guesses[0]}?)" if guesses else ""
    err = ConfigError("", f"unknown config key config.{key}{hint}")
    err.key = key
    return err


def _check_known(keys: Sequence[str]) -> None:
    known = _flatten(default_config())
    for key in keys:
        if key not in known and not any(k.startswith(key + ".") for k in known):
            raise unknown_key(key)


def validate(config: ConfigDict) -> ConfigDict:
    """Checks keys, types and consistency; raises ConfigError naming the first bad key."""
    defaults = _flatten(default_config())
    values = _flatten(config)
    for key in values:
        if key not in defaults:
            raise unknown_key(key)
    for key, default in defaults.items():
        if key not in values:
            raise ConfigError(
                key, "missing (configs must start from clipjax.config.default_config())")
        value = values[key]
        if not _type_ok(default, value):
            raise ConfigError(
                key, f"expected {type(default).__name__}, got {type(value).__name__} {value!r}")
    for key, choices in _CHOICES.items():
        if values[key] not in choices:
            options = ", ".join(map(repr, choices))
            raise ConfigError(key, f"must be one of {options}; got {values[key]!r}")
    for key in _POSITIVE:
        if values[key] <= 0:
            raise ConfigError(key, f"must be positive; got {values[key]!r}")
    for key in _NON_NEGATIVE:
        if values[key] < 0:
            raise ConfigError(key, f"must be >= 0; got {values[key]!r}")
    _check_model(config.model)
    if not 0.0 <= float(config.train.ema_decay) < 1.0:
        raise ConfigError("train.ema_decay", f"must be in [0, 1); got {config.train.ema_decay!r}")
    _check_mesh(config)
    _check_loss(config)
    return config


def _check_loss(config: ConfigDict) -> None:
    """`loss.chunk` only tiles the ring, and must divide every device's micro-batch."""
    chunk = config.loss.chunk
    if chunk and config.loss.impl != "ring":
        raise ConfigError("loss.chunk", "tiles the ring loss only: set loss.impl='ring' or 0")
    micro = config.data.batch_size // max(config.train.grad_accum, 1)
    if chunk and micro % chunk:
        raise ConfigError(
            "loss.chunk", f"{chunk} does not divide the micro-batch {micro} "
            "(data.batch_size / train.grad_accum)")
    if not math.isfinite(config.loss.logit_scale_max):
        raise ConfigError("loss.logit_scale_max", "must be finite")


def _check_model(m: ConfigDict) -> None:
    img, txt = m.image, m.text
    if img.kind == "vit":
        if img.image_size % img.patch_size:
            raise ConfigError(
                "model.image.patch_size",
                f"image_size {img.image_size} is not divisible by patch_size {img.patch_size}")
        if img.width % img.heads:
            raise ConfigError(
                "model.image.heads", f"{img.heads} heads do not divide width {img.width}")
    else:
        if len(img.resnet_layers) != 4 or any(int(n) < 1 for n in img.resnet_layers):
            raise ConfigError("model.image.resnet_layers", "needs four positive block counts")
        if img.image_size % 32:
            raise ConfigError("model.image.image_size", "a ResNet needs a multiple of 32")
        if (img.resnet_width * 32) % img.resnet_heads:
            raise ConfigError(
                "model.image.resnet_heads",
                f"{img.resnet_heads} heads do not divide the pooled width {img.resnet_width * 32}")
    if txt.width % txt.heads:
        raise ConfigError("model.text.heads", f"{txt.heads} heads do not divide width {txt.width}")
    for key in ("mean", "std"):
        if len(img[key]) != 3:
            raise ConfigError(f"model.image.{key}", "needs 3 values (R, G, B)")
    if any(s <= 0 for s in img.std):
        raise ConfigError("model.image.std", "must be positive")
    pd = float(img.patch_dropout)
    if not 0.0 <= pd < 1.0:
        raise ConfigError("model.image.patch_dropout", f"must be in [0, 1); got {pd!r}")
    if pd and img.kind != "vit":
        raise ConfigError("model.image.patch_dropout", "drops ViT patch tokens; this is a ResNet")
    if img.pool != "tok" and img.kind != "vit":
        raise ConfigError("model.image.pool", "pools ViT tokens; a ResNet pools by attention")


def _check_mesh(c: ConfigDict) -> None:
    sizes = {k: c.mesh[k] for k in c.mesh}
    for k, v in sizes.items():
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{k}", f"must be a positive size or -1; got {v}")
    if sum(v == -1 for v in sizes.values()) > 1:
        raise ConfigError("mesh", "at most one axis may be -1")
    if sizes.get("slices", 1) < 1:
        raise ConfigError("mesh.slices", f"must be a positive slice count; got {sizes['slices']}")
    axes = set(sizes)
    for i, rule in enumerate(c.sharding_rules):
        if not (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ConfigError(
                f"sharding_rules[{i}]", f"expected (logical_name, mesh_axes); got {rule!r}")
        target = rule[1]
        targets = (target,) if isinstance(target, str) or target is None else tuple(target)
        for t in targets:
            if t is not None and t not in axes:
                raise ConfigError(
                    f"sharding_rules[{i}]", f"mesh axis {t!r} is not one of {sorted(axes)}")
    if sizes.get("slices", 1) > 1:
        batch = [t for name, t in c.sharding_rules if name == "batch"][:1]
        targets = batch[0] if batch else None
        targets = (targets,) if isinstance(targets, str) or targets is None else tuple(targets)
        if "slices" not in targets:
            raise ConfigError(
                "sharding_rules", f"mesh.slices={sizes['slices']} but the 'batch' rule does not "
                "split the batch over the 'slices' axis (every slice would repeat the work)")
    if c.data.batch_size % c.train.grad_accum:
        raise ConfigError(
            "train.grad_accum",
            f"{c.train.grad_accum} does not divide data.batch_size {c.data.batch_size}")
