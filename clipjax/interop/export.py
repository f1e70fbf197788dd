"""Export of a clipjax model to open_clip: a .safetensors state_dict and its model config.

    clipjax export open_clip --workdir W --out model.safetensors --model-config-out my-clip.json

then, in PyTorch:

    open_clip.add_model_config("my-clip.json")          # registers the name "my-clip"
    model = open_clip.create_model("my-clip", pretrained="model.safetensors")

`--out DIR` (no .safetensors suffix) writes open_clip's `local-dir:` layout instead
(`open_clip_model.safetensors` + `open_clip_config.json` holding the model and
preprocessing configs): `open_clip.create_model_and_transforms("local-dir:DIR")`.

The weights go through `clipjax.interop.open_clip.to_open_clip_state_dict`, the
inverse of the import mapping, so import → export → import is exact.

The workdir and every output may be relative, absolute or a URI (`gs://...`):
files are written whole through `clipjax.paths`.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from ml_collections import ConfigDict

from clipjax import paths
from clipjax.config import OPENAI_MEAN, OPENAI_STD
from clipjax.errors import ClipjaxError

LOCAL_DIR_WEIGHTS = "open_clip_model.safetensors"
LOCAL_DIR_CONFIG = "open_clip_config.json"


def open_clip_model_config(model_cfg: ConfigDict) -> dict[str, Any]:
    """The open_clip model-config dict (model_configs/*.json format) for `config.model`;
    `clipjax.models.presets.from_open_clip_json` maps it back."""
    img, txt = model_cfg.image, model_cfg.text
    if img.kind == "resnet":
        if (img.resnet_width * 32) % img.resnet_heads:
            raise ClipjaxError(f"model.image.resnet_heads={img.resnet_heads} does not divide "
                               f"32·resnet_width; open_clip cannot express it")
        vision = {"image_size": int(img.image_size),
                  "layers": [int(n) for n in img.resnet_layers],
                  "width": int(img.resnet_width),
                  "head_width": int(img.resnet_width) * 32 // int(img.resnet_heads),
                  "patch_size": None}
    else:
        if img.width % img.heads:
            raise ClipjaxError(f"model.image.heads={img.heads} does not divide width "
                               f"{img.width}")
        vision = {"image_size": int(img.image_size), "layers": int(img.layers),
                  "width": int(img.width), "head_width": int(img.width) // int(img.heads),
                  "patch_size": int(img.patch_size), "mlp_ratio": float(img.mlp_ratio)}
        if img.get("pool", "tok") != "tok":
            vision["pool_type"] = img.pool
    text = {"context_length": int(txt.context_length), "vocab_size": int(txt.vocab_size),
            "width": int(txt.width), "heads": int(txt.heads), "layers": int(txt.layers),
            "mlp_ratio": float(txt.mlp_ratio)}
    if txt.pool != "argmax":
        text["pool_type"] = txt.pool
    out = {"embed_dim": int(model_cfg.embed_dim), "quick_gelu": model_cfg.act == "quick_gelu",
           "vision_cfg": vision, "text_cfg": text,
           "init_logit_scale": float(model_cfg.logit_scale_init)}
    if model_cfg.use_logit_bias:
        out["init_logit_bias"] = float(model_cfg.logit_bias_init)
    return out


def open_clip_preprocess_config(model_cfg: ConfigDict) -> dict[str, Any]:
    """open_clip's `preprocess_cfg` (what `create_model_and_transforms` builds transforms
    from) for the model's inference recipe."""
    img = model_cfg.image
    return {"size": int(img.image_size), "mode": "RGB",
            "mean": [float(x) for x in img.mean], "std": [float(x) for x in img.std],
            "interpolation": img.get("interpolation", "bicubic"), "resize_mode": "shortest",
            "fill_color": 0}


@dataclass
class Exported:
    weights: str
    model_config: str | None = None
    notes: list[str] = field(default_factory=list)
    tensors: int = 0


def export_open_clip(workdir: str, out: str, *, step: int | None = None,
                     model_config_out: str | None = None, params: str = "raw") -> Exported:
    """Writes the model in `workdir` (latest or `step`) for open_clip; see the module doc.
    `params="ema"`: the params' moving average (train.ema_decay > 0)."""
    from clipjax import checkpoint

    wd, step = checkpoint.resolve(workdir, step)
    config = checkpoint.read_config(wd)
    weights = checkpoint.restore_params(wd, step, which=params)
    return write_open_clip(weights, config.model, out, model_config_out=model_config_out,
                           metadata={"clipjax_workdir": wd, "clipjax_step": str(step),
                                     "clipjax_params": params})


def write_open_clip(params: Any, model_cfg: ConfigDict, out: str, *,
                    model_config_out: str | None = None,
                    metadata: dict[str, str] | None = None) -> Exported:
    """Writes `params` as an open_clip .safetensors (or local-dir) plus configs."""
    from safetensors.numpy import save

    from clipjax.interop.open_clip import to_open_clip_state_dict

    out = paths.to_str(out)
    model_json = open_clip_model_config(model_cfg)
    preprocess = open_clip_preprocess_config(model_cfg)
    local_dir = not out.endswith(".safetensors")
    weights = posixpath.join(out, LOCAL_DIR_WEIGHTS) if local_dir else out
    state_dict = to_open_clip_state_dict(params, model_cfg)
    try:
        data = save(state_dict, metadata={"format": "pt", **(metadata or {})})
        paths.write_bytes(weights, data)
    except OSError as e:
        raise ClipjaxError(f"cannot write {weights}: {e}") from None
    result = Exported(weights=weights, tensors=len(state_dict))
    if local_dir:
        result.model_config = posixpath.join(out, LOCAL_DIR_CONFIG)
        _write_json(result.model_config, {"model_cfg": model_json,
                                          "preprocess_cfg": preprocess})
    if model_config_out:
        if not model_config_out.endswith(".json"):
            raise ClipjaxError(f"--model-config-out {model_config_out!r}: open_clip registers "
                               "only .json files (the file stem becomes the model name)")
        result.model_config = paths.to_str(model_config_out)
        _write_json(result.model_config, model_json)
    if model_cfg.tokenizer.kind != "clip_bpe":
        result.notes.append(
            f"the model uses a {model_cfg.tokenizer.kind} tokenizer "
            f"({model_cfg.tokenizer.path or 'default'}); open_clip's default tokenizer is "
            "CLIP BPE, so tokenize texts with the model's own tokenizer")
    if not local_dir and (preprocess["mean"], preprocess["std"]) != (
            list(OPENAI_MEAN), list(OPENAI_STD)):
        result.notes.append(
            f"the model normalises images with mean {preprocess['mean']} and std "
            f"{preprocess['std']}: pass image_mean/image_std to "
            "open_clip.create_model_and_transforms (a local-dir export records them)")
    return result


def _write_json(path: str, obj) -> None:
    try:
        paths.write_text(path, json.dumps(obj, indent=2) + "\n")
    except OSError as e:
        raise ClipjaxError(f"cannot write {path}: {e}") from None
