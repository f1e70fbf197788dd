"""Import of open_clip checkpoints (and the reverse mapping, for export).

The architecture comes from a preset name (`clipjax.models.presets`), an
open_clip model-config JSON file, or inline JSON; the weights from a
.safetensors or PyTorch file in open_clip's (= OpenAI's) state_dict layout.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

from ml_collections import ConfigDict

from clipjax import paths
from clipjax.errors import ClipjaxError
from clipjax.interop import state_dict as sd_lib
from clipjax.interop.weights_file import read_state_dict
from clipjax.models import presets


def resolve_model_config(spec: str | dict | ConfigDict) -> ConfigDict:
    """`config.model` from a preset name, a model-config .json path, inline JSON or a dict."""
    if isinstance(spec, ConfigDict):
        return ConfigDict(spec.to_dict())
    if isinstance(spec, dict):
        return presets.from_open_clip_json(spec)
    text = spec.strip()
    if text.startswith("{"):
        try:
            return presets.from_open_clip_json(json.loads(text))
        except json.JSONDecodeError as e:
            raise ClipjaxError(f"--model-config: invalid JSON ({e})") from None
    if text.endswith(".json") or os.path.sep in text or paths.is_remote(text):
        if not paths.is_file(text):
            raise ClipjaxError(f"model config file {text!r} does not exist")
        try:
            data = json.loads(paths.read_text(text))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ClipjaxError(f"cannot read model config {text!r}: {e}") from None
        return presets.from_open_clip_json(data)
    if text not in presets.names() and (installed := _installed_open_clip_config(text)):
        return resolve_model_config(installed)
    return presets.model_config(text)


def _installed_open_clip_config(name: str) -> str | None:
    """open_clip's own model_configs/<name>.json when open-clip-torch is installed (found
    without importing it), so every architecture clipjax implements is reachable by name."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "model_configs",
                        f"{name}.json")
    return path if os.path.isfile(path) else None


def import_open_clip(checkpoint: str, model_config: str | dict | ConfigDict, *,
                     act: str | None = None, image_size: int = 0, context_length: int = 0,
                     resized: list[str] | None = None) -> tuple[dict, ConfigDict]:
    """(params, full config) from an open_clip checkpoint file and its model config;
    `image_size` / `context_length` (0 = the config's) resize the position embeddings
    (see `state_dict.from_state_dict`; what was resized goes to `resized`)."""
    from clipjax import config as config_lib

    model_cfg = resolve_model_config(model_config)
    if act:
        model_cfg.act = act
    if image_size:
        model_cfg.image.image_size = int(image_size)
    if context_length:
        model_cfg.text.context_length = int(context_length)
    config = config_lib.default_config()
    config.model = model_cfg
    config_lib.validate(config)
    sd = read_state_dict(checkpoint)
    return sd_lib.from_state_dict(sd, model_cfg, resized), config


def to_open_clip_state_dict(params: Any, model_cfg: ConfigDict) -> dict:
    """open_clip `CLIP.state_dict()` layout (= OpenAI's), float32 numpy; for export."""
    return sd_lib.to_state_dict(params, model_cfg)
