"""Named model presets (open_clip's names and numbers) and open_clip config conversion.

`model_config("ViT-B-32")` gives a `config.model` ConfigDict equal to what
open_clip 3.3.0's `model_configs/ViT-B-32.json` describes; a `-quickgelu`
suffix selects QuickGELU (what OpenAI's own weights were trained with).
`from_open_clip_json(d)` converts any open_clip model-config dict that uses
only features clipjax implements, and names the first one it does not.
"""

from __future__ import annotations

import copy
from typing import Any

from ml_collections import ConfigDict

from clipjax.errors import ClipjaxError

_TEXT_512 = {"width": 512, "heads": 8, "layers": 12}


def _vit(embed, size, layers, width, patch, text, head_width=64, mlp_ratio=None):
    vision = {"image_size": size, "layers": layers, "width": width, "patch_size": patch}
    if head_width != 64:
        vision["head_width"] = head_width
    if mlp_ratio is not None:
        vision["mlp_ratio"] = mlp_ratio
    return {"embed_dim": embed, "vision_cfg": vision,
            "text_cfg": {"context_length": 77, "vocab_size": 49408, **text}}


def _rn(embed, size, layers, width, text):
    return {"embed_dim": embed,
            "vision_cfg": {"image_size": size, "layers": list(layers), "width": width,
                           "patch_size": None},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, **text}}


def _text(width, heads, layers=12):
    return {"width": width, "heads": heads, "layers": layers}


# open_clip 3.3.0 model_configs/<name>.json, for the architectures clipjax implements.
_OPEN_CLIP = {
    "RN50": _rn(1024, 224, (3, 4, 6, 3), 64, _TEXT_512),
    "RN101": _rn(512, 224, (3, 4, 23, 3), 64, _TEXT_512),
    "RN50x4": _rn(640, 288, (4, 6, 10, 6), 80, _text(640, 10)),
    "RN50x16": _rn(768, 384, (6, 8, 18, 8), 96, _text(768, 12)),
    "RN50x64": _rn(1024, 448, (3, 15, 36, 10), 128, _text(1024, 16)),
    "ViT-S-32": _vit(384, 224, 12, 384, 32, _text(384, 6)),
    "ViT-S-32-alt": _vit(256, 224, 12, 384, 32, _text(256, 4, 10)),
    "ViT-S-16": _vit(384, 224, 12, 384, 16, _text(384, 6)),
    "ViT-S-16-alt": _vit(256, 224, 12, 384, 16, _text(256, 4, 10)),
    "ViT-M-32": _vit(512, 224, 12, 512, 32, _TEXT_512),
    "ViT-M-32-alt": _vit(384, 224, 12, 512, 32, _text(384, 6)),
    "ViT-M-16": _vit(512, 224, 12, 512, 16, _TEXT_512),
    "ViT-B-32": _vit(512, 224, 12, 768, 32, _TEXT_512),
    "ViT-B-32-256": _vit(512, 256, 12, 768, 32, _TEXT_512),
    "ViT-B-32-plus-256": _vit(640, 256, 12, 896, 32, _text(640, 10)),
    "ViT-B-16": _vit(512, 224, 12, 768, 16, _TEXT_512),
    "ViT-B-16-plus": _vit(640, 224, 12, 896, 16, _text(640, 10)),
    "ViT-B-16-plus-240": _vit(640, 240, 12, 896, 16, _text(640, 10)),
    "ViT-L-14": _vit(768, 224, 24, 1024, 14, _text(768, 12)),
    "ViT-L-14-280": _vit(768, 280, 24, 1024, 14, _text(768, 12)),
    "ViT-L-14-336": _vit(768, 336, 24, 1024, 14, _text(768, 12)),
    "ViT-L-16": _vit(768, 224, 24, 1024, 16, _text(768, 12)),
    "ViT-L-16-320": _vit(768, 320, 24, 1024, 16, _text(768, 12)),
    "ViT-H-14": _vit(1024, 224, 32, 1280, 14, _text(1024, 16, 24), head_width=80),
    "ViT-H-14-378": _vit(1024, 378, 32, 1280, 14, _text(1024, 16, 24), head_width=80),
    "ViT-H-16": _vit(1024, 224, 32, 1280, 16, _text(1024, 16, 24), head_width=80),
    "ViT-g-14": _vit(1024, 224, 40, 1408, 14, _text(1024, 16, 24), head_width=88,
                     mlp_ratio=4.3637),
    "ViT-bigG-14": _vit(1280, 224, 48, 1664, 14, _text(1280, 20, 32), head_width=104,
                        mlp_ratio=4.9231),
    "ViT-e-14": _vit(1280, 224, 56, 1792, 14, _text(1280, 20, 36), head_width=112,
                     mlp_ratio=8.5715),
}
# The -quickgelu twins open_clip ships (same numbers, QuickGELU).
_QUICKGELU = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16",
              "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-H-14-378", "ViT-bigG-14")

# Tiny sizes for tests and CPU demos: the real tokenizer (vocab 49408, context 77) fits.
_TINY = {
    "tiny-vit": _vit(32, 32, 2, 64, 8, _text(64, 4, 2), head_width=16),
    "tiny-rn": _rn(32, 64, (1, 1, 1, 1), 8, _text(64, 4, 2)),
    "small-vit": _vit(128, 64, 4, 192, 8, _text(128, 4, 4), head_width=48),
}


def _table() -> dict[str, dict]:
    table = dict(_OPEN_CLIP)
    for name in _QUICKGELU:
        table[f"{name}-quickgelu"] = {**_OPEN_CLIP[name], "quick_gelu": True}
    table.update(_TINY)
    return table


def names() -> list[str]:
    """Every preset name `model_config` accepts."""
    return list(_table())


def open_clip_json(name: str) -> dict:
    """The open_clip-format model config dict behind a preset."""
    table = _table()
    if name not in table:
        raise ClipjaxError(f"unknown model preset {name!r}; known presets: {', '.join(table)}")
    return copy.deepcopy(table[name])


def model_config(name: str) -> ConfigDict:
    """`config.model` for a named preset (open_clip's names; see `names()`)."""
    return from_open_clip_json(open_clip_json(name))


# ----------------------------------------------------------------- open_clip JSON -> config

# Keys whose open_clip default is the only value clipjax implements.
_VISION_DEFAULTS: dict[str, Any] = {
    "ls_init_value": None, "patch_dropout": 0.0, "attentional_pool": False,
    "no_ln_pre": False, "pos_embed_type": "learnable", "final_ln_after_pool": False,
    "output_tokens": False, "act_kwargs": None, "norm_kwargs": None,
    "block_type": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
    "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
    "timm_model_name": None,
}
_VISION_IGNORED = {  # meaningful only with a feature above, or only to timm towers
    "attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained", "timm_pool",
    "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path", "patch_size"}
_TEXT_DEFAULTS: dict[str, Any] = {
    "hf_model_name": None, "hf_tokenizer_name": None, "tokenizer_mode": None,
    "tokenizer_kwargs": None, "ls_init_value": None, "embed_cls": False,
    "no_causal_mask": False, "final_ln_after_pool": False, "proj_bias": False,
    "proj_type": "linear", "output_tokens": False, "act_kwargs": None, "norm_kwargs": None,
    "block_type": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
    "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
}
_TEXT_IGNORED = {"pad_id", "eos_id", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
_TOP_DEFAULTS: dict[str, Any] = {"nonscalar_logit_scale": False, "multimodal_cfg": None}
_TOP_IGNORED = {"custom_text", "cast_dtype"}  # state-dict layout / precision, not architecture


_SAME_AS_DEFAULT = {"block_type": "default"}  # open_clip treats these like the default


def _check_defaults(cfg: dict, defaults: dict, known: set, where: str) -> None:
    """Rejects keys clipjax does not know and features it does not implement, by name."""
    for key, value in cfg.items():
        if key in known or (where == "" and key in _TOP_IGNORED):
            continue
        if key not in defaults:
            raise ClipjaxError(f"open_clip model config key {where}{key!r} is not known")
        if value != defaults[key] and value != _SAME_AS_DEFAULT.get(key, defaults[key]):
            raise ClipjaxError(
                f"open_clip model config {where}{key}={value!r} is not supported by clipjax "
                f"(only {defaults[key]!r})")


def from_open_clip_json(data: dict) -> ConfigDict:
    """`config.model` from an open_clip model-config dict (the model_configs/*.json format)."""
    from clipjax.config import default_config

    if not isinstance(data, dict) or "vision_cfg" not in data or "text_cfg" not in data:
        raise ClipjaxError("an open_clip model config needs 'embed_dim', 'vision_cfg' and "
                           "'text_cfg'")
    top_known = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale",
                 "init_logit_bias", "preprocess_cfg"}
    _check_defaults(data, _TOP_DEFAULTS, top_known, "")
    m = default_config().model
    m.embed_dim = int(data["embed_dim"])
    m.act = "quick_gelu" if data.get("quick_gelu", False) else "gelu"
    if data.get("init_logit_scale") is not None:
        m.logit_scale_init = float(data["init_logit_scale"])
    if data.get("init_logit_bias") is not None:
        m.use_logit_bias = True
        m.logit_bias_init = float(data["init_logit_bias"])
    _vision(m.image, data["vision_cfg"])
    _text_tower(m.text, data["text_cfg"])
    _preprocess(m.image, data.get("preprocess_cfg") or {})
    return m


def _square(size, key: str) -> int:
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            raise ClipjaxError(f"open_clip model config {key}={size!r}: only square images")
        size = size[0]
    return int(size)


def _vision(img: ConfigDict, v: dict) -> None:
    known = {"image_size", "layers", "width", "head_width", "mlp_ratio", "pool_type"}
    _check_defaults(v, _VISION_DEFAULTS, known | _VISION_IGNORED, "vision_cfg.")
    pool = v.get("pool_type", "tok")
    if pool not in ("tok", "avg"):
        raise ClipjaxError(f"open_clip model config vision_cfg.pool_type={pool!r} is not "
                           "supported by clipjax (tok, avg)")
    img.image_size = _square(v.get("image_size", 224), "vision_cfg.image_size")
    head_width = int(v.get("head_width", 64))
    width = int(v.get("width", 768))
    layers = v.get("layers", 12)
    if isinstance(layers, list | tuple):
        img.kind = "resnet"
        img.resnet_layers = tuple(int(n) for n in layers)
        img.resnet_width = width
        img.resnet_heads = width * 32 // head_width
        if pool != "tok":
            raise ClipjaxError(f"open_clip model config vision_cfg.pool_type={pool!r}: a "
                               "ModifiedResNet pools by attention")
        return
    img.kind = "vit"
    img.patch_size = _square(v.get("patch_size", 16), "vision_cfg.patch_size")
    img.width = width
    img.layers = int(layers)
    img.heads = width // head_width
    img.mlp_ratio = float(v.get("mlp_ratio", 4.0))
    img.pool = pool


def _text_tower(txt: ConfigDict, t: dict) -> None:
    known = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio",
             "pool_type"}
    _check_defaults(t, _TEXT_DEFAULTS, known | _TEXT_IGNORED, "text_cfg.")
    pool = t.get("pool_type", "argmax")
    if pool not in ("argmax", "first", "last"):
        raise ClipjaxError(f"open_clip model config text_cfg.pool_type={pool!r} is not "
                           "supported by clipjax (argmax, first, last)")
    txt.pool = pool
    txt.context_length = int(t.get("context_length", 77))
    txt.vocab_size = int(t.get("vocab_size", 49408))
    txt.width = int(t.get("width", 512))
    txt.heads = int(t.get("heads", 8))
    txt.layers = int(t.get("layers", 12))
    txt.mlp_ratio = float(t.get("mlp_ratio", 4.0))


def _preprocess(img: ConfigDict, p: dict) -> None:
    for key, value in p.items():
        if key in ("mean", "std"):
            img[key] = tuple(float(x) for x in value)
        elif key == "interpolation":
            if value not in ("bicubic", "bilinear", "nearest"):
                raise ClipjaxError(f"preprocess_cfg.interpolation={value!r} is not supported")
            img.interpolation = value
        elif key == "size":
            if _square(value, "preprocess_cfg.size") != img.image_size:
                raise ClipjaxError("preprocess_cfg.size differs from vision_cfg.image_size")
        elif key == "resize_mode" and value != "shortest" or key not in (
                "resize_mode", "fill_color"):
            raise ClipjaxError(f"preprocess_cfg.{key}={value!r} is not supported by clipjax")
