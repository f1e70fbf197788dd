"""Config-file loading with overrides, JSON round trips, and the names every module
imports: `default_config()` (clipjax/config_defaults.py) and `validate()`
(clipjax/config_checks.py).

Every recipe in `configs/` starts from `default_config()` and changes values;
`validate()` then rejects unknown keys, wrong types and inconsistent
combinations before anything is compiled, naming the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import ml_collections
from ml_collections import ConfigDict

from clipjax.config_checks import _check_known, unknown_key, validate
from clipjax.config_defaults import (
    DEFAULT_SHARDING_RULES,
    OPENAI_MEAN,
    OPENAI_STD,
    default_config,
)
from clipjax.errors import ConfigError

__all__ = ["DEFAULT_SHARDING_RULES", "OPENAI_MEAN", "OPENAI_STD", "ConfigError", "default_config",
           "from_json", "kept_patches", "load", "load_args", "model_only", "to_json",
           "unknown_key", "validate"]


# --------------------------------------------------------------------------- loading


def load(config_arg: str | None, overrides: Sequence[str] = ()) -> ConfigDict:
    """Loads `path.py[:arg]` (or the default) and applies `--config.k=v` overrides, validated.

    Uses ml_collections' own flag parsing, so overrides follow the absl
    convention that big_vision and scenic use, with its type checks.
    """
    from absl import flags
    from ml_collections import config_flags

    argv = ["clipjax"]
    if config_arg:
        argv.append(f"--config={config_arg}")
    argv.extend(overrides)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", default=None, flag_values=fv, lock_config=True, sys_argv=argv)
    if not config_arg:
        if overrides:
            raise ConfigError("", "--config.KEY=VALUE overrides need --config FILE.py")
        return validate(default_config())
    path = config_arg.split(":", 1)[0]
    if not os.path.isfile(path):
        raise ConfigError("", f"config file {path!r} does not exist")
    # Every key a config may hold is a default_config() key: an override of any other is a
    # typo, named here (absl would print only the key's repr).
    _check_known([o.lstrip("-").split("=", 1)[0].removeprefix("config.") for o in overrides])
    try:
        fv(argv, known_only=False)
        config = fv.config
        config = ConfigDict(config.to_dict()) if config is not None else None
    except flags.Error as e:
        raise ConfigError(_key_from_flag_error(str(e), overrides), str(e).strip()) from None
    except (KeyError, AttributeError, TypeError, ValueError, OSError, SyntaxError) as e:
        key = _key_from_flag_error(str(e), overrides)
        if key and repr(key.rsplit(".", 1)[-1]) in str(e):
            raise unknown_key(key) from None
        raise ConfigError(key, f"{config_arg}: {str(e).strip()}") from None
    if config is None:
        raise ConfigError("", f"config file {config_arg!r} returned nothing")
    return validate(config)


def load_args(config_args: Sequence[str]) -> ConfigDict:
    """`load` for the CLI's `args.config_args` (`--config=FILE[:ARG]` and `--config.k=v`)."""
    files = [a.split("=", 1)[1] for a in config_args if a.startswith("--config=")]
    overrides = [a for a in config_args if a.startswith("--config.")]
    if len(files) > 1:
        raise ConfigError("", "--config given more than once")
    return load(files[0] if files else None, overrides)


def _key_from_flag_error(message: str, overrides: Sequence[str]) -> str:
    for o in overrides:
        key = o.lstrip("-").split("=", 1)[0].removeprefix("config.")
        if key and (key in message or repr(key.rsplit(".", 1)[-1]) in message):
            return key
    return ""


def from_json(text: str) -> ConfigDict:
    """Reads a config written by `to_json` (a workdir's config.json), validated."""
    data = json.loads(text)
    config = default_config()
    _merge(config, data, "")
    return validate(config)


def _merge(config: ConfigDict, data: dict, prefix: str) -> None:
    for k, v in data.items():
        key = prefix + k
        if k not in config:
            raise unknown_key(key)
        if isinstance(config[k], ConfigDict):
            _merge(config[k], v, key + ".")
        else:
            default = config[k]
            if isinstance(default, tuple):
                v = _to_tuple(v)
            elif isinstance(default, float) and isinstance(v, int):
                v = float(v)
            with config.ignore_type():
                config[k] = v


def _to_tuple(v):
    if isinstance(v, list):
        return tuple(_to_tuple(x) for x in v)
    return v


def to_json(config: ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def model_only(config: ConfigDict) -> ConfigDict:
    """A default config carrying `config.model`: what a workdir needs to rebuild the model."""
    out = default_config()
    out.model = ml_collections.ConfigDict(config.model.to_dict())
    return out


def kept_patches(patches: int, dropout: float) -> int:
    """How many of `patches` tokens an image keeps under `model.image.patch_dropout`
    (FLIP): static, so the program compiles once; at least one. Here, below the model
    and the input pipeline, because both need it."""
    return max(1, int(round((1.0 - float(dropout)) * patches))) if dropout else patches
