"""Import of OpenAI CLIP state_dicts, the architecture inferred from the tensors.

Follows OpenAI's (and open_clip's) `build_model`: a ViT has `visual.proj`; widths,
depths, patch and image size come from tensor shapes and key counts; heads are
width / 64; OpenAI trained with QuickGELU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from ml_collections import ConfigDict

from clipjax.errors import ClipjaxError
from clipjax.interop import state_dict as sd_lib
from clipjax.interop.weights_file import read_state_dict

HEAD_WIDTH = 64


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ClipjaxError(f"not an OpenAI CLIP state_dict: it has no {key!r}")
    return tuple(sd[key].shape)


def _count(sd: Mapping[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def _grid(n_positions: int, key: str) -> int:
    grid = round(math.sqrt(n_positions - 1))
    if grid * grid + 1 != n_positions:
        raise ClipjaxError(f"{key!r} has {n_positions} positions, not a square grid + 1")
    return grid


def infer_model_config(state_dict: Mapping[str, Any]) -> ConfigDict:
    """`config.model` for an OpenAI-layout state_dict (ViT or ModifiedResNet)."""
    from clipjax.config import default_config

    sd = sd_lib.normalize(state_dict)
    m = default_config().model
    m.act = "quick_gelu"
    img = m.image
    if "visual.proj" in sd:
        width, _, patch, _ = _shape(sd, "visual.conv1.weight")
        img.kind = "vit"
        img.width = width
        img.heads = max(1, width // HEAD_WIDTH)
        img.patch_size = patch
        img.layers = _count(sd, r"^visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$")
        key = "visual.positional_embedding"
        img.image_size = patch * _grid(_shape(sd, key)[0], key)
    else:
        img.kind = "resnet"
        img.resnet_layers = tuple(_count(sd, rf"^visual\.layer{b}\.(\d+)\.") for b in (1, 2, 3, 4))
        img.resnet_width = _shape(sd, "visual.layer1.0.conv1.weight")[0]
        img.resnet_heads = img.resnet_width * 32 // HEAD_WIDTH
        key = "visual.attnpool.positional_embedding"
        img.image_size = 32 * _grid(_shape(sd, key)[0], key)
    m.embed_dim = _shape(sd, "text_projection")[1]
    txt = m.text
    txt.context_length = _shape(sd, "positional_embedding")[0]
    txt.vocab_size = _shape(sd, "token_embedding.weight")[0]
    txt.width = _shape(sd, "ln_final.weight")[0]
    txt.heads = max(1, txt.width // HEAD_WIDTH)
    txt.layers = _count(sd, r"^transformer\.resblocks\.(\d+)\.")
    m.use_logit_bias = "logit_bias" in sd
    return m


def import_openai(checkpoint: str, *, act: str | None = None, image_size: int = 0,
                  context_length: int = 0, resized: list[str] | None = None
                  ) -> tuple[dict, ConfigDict]:
    """(params, full config) from an OpenAI CLIP state_dict file; `image_size` /
    `context_length` (0 = the checkpoint's) resize the position embeddings."""
    from clipjax import config as config_lib

    sd = read_state_dict(checkpoint)
    model_cfg = infer_model_config(sd)
    if act:
        model_cfg.act = act
    if image_size:
        model_cfg.image.image_size = int(image_size)
    if context_length:
        model_cfg.text.context_length = int(context_length)
    config = config_lib.default_config()
    config.model = model_cfg
    config_lib.validate(config)
    return sd_lib.from_state_dict(sd, model_cfg, resized), config
