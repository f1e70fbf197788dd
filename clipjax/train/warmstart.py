"""Initial params from another workdir or checkpoint (`train.init_from`), e.g. LiT.

LiT locks an image tower that was trained elsewhere (an imported OpenAI /
open_clip checkpoint) and trains a text tower against it. Every param whose
path matches `train.init_from_keys` is taken from the source checkpoint (same
path, same shape required); the others keep their fresh init. The arrays are
restored straight onto this run's shardings.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import jax
import orbax.checkpoint as ocp

from clipjax import checkpoint, models
from clipjax.errors import ClipjaxError, ConfigError
from clipjax.optim import path_str

log = logging.getLogger("clipjax.train")


def _flat(tree) -> dict[str, Any]:
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_initial_params(source: str, keys: str, params: Any) -> tuple[Any, list[str]]:
    """`params` with the leaves matching `keys` replaced from `source`; also the paths taken."""
    workdir, step = checkpoint.resolve(source)
    pattern = re.compile(keys or ".*")
    mine = _flat(params)
    wanted = {k for k in mine if pattern.fullmatch(k)}
    if not wanted:
        raise ConfigError("train.init_from_keys", f"{keys!r} matches no param path")
    mgr = ocp.CheckpointManager(
        checkpoint.checkpoint_dir(workdir),
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_handlers={"params": ocp.PyTreeCheckpointHandler(),
                       "metadata": ocp.JsonCheckpointHandler()})
    try:
        meta = mgr.item_metadata(step)["params"]
        if models.is_scanned(meta) != models.is_scanned(params):
            return _load_relayout(workdir, step, keys, params, wanted)
        theirs = _flat(meta)
        missing = sorted(k for k in wanted if k not in theirs)
        wrong = sorted(k for k in wanted if k in theirs
                       and tuple(theirs[k].shape) != tuple(mine[k].shape))
        if missing or wrong:
            detail = (f"missing {missing[:5]}" if missing else "") + (
                f" shape differs for {wrong[:5]}" if wrong else "")
            raise ClipjaxError(f"train.init_from={source}: the checkpoint does not fit this "
                               f"model's {len(wanted)} params matching {keys!r}:{detail}")
        # Restore only what we take, each leaf onto its param's sharding.
        abstract = jax.tree_util.tree_map_with_path(
            lambda p, m: _target(path_str(p), m, mine, wanted), meta)
        restored = mgr.restore(step, args=ocp.args.Composite(
            params=ocp.args.PyTreeRestore(
                item=abstract,
                restore_args=jax.tree.map(_restore_arg, abstract))))["params"]
    except ClipjaxError:
        raise
    except Exception as e:
        raise ClipjaxError(f"train.init_from={source}: cannot restore params: {e}") from e
    finally:
        mgr.close()
    got = _flat(restored)
    taken = sorted(wanted)
    out = jax.tree_util.tree_map_with_path(
        lambda p, x: got[path_str(p)].astype(x.dtype) if path_str(p) in wanted else x, params)
    log.info("init_from %s step %d: %d params matching %r", workdir, step, len(taken), keys)
    return out, taken


def _load_relayout(workdir: str, step: int, keys: str, params: Any,
                   wanted: set[str]) -> tuple[Any, list[str]]:
    """The source stores the other layer layout (scanned vs unrolled): restore it on one
    device, convert with `stack_layers` / `unstack_layers`, then place each leaf."""
    source = checkpoint.restore_params(workdir, step)
    convert = models.stack_layers if models.is_scanned(params) else models.unstack_layers
    theirs = _flat(convert(source))
    mine = _flat(params)
    bad = sorted(k for k in wanted if k not in theirs or theirs[k].shape != mine[k].shape)
    if bad:
        raise ClipjaxError(f"train.init_from={workdir}: the checkpoint does not fit this model's "
                           f"params matching {keys!r}: {bad[:5]}")
    out = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.device_put(theirs[path_str(p)].astype(x.dtype), x.sharding)
        if path_str(p) in wanted else x, params)
    return out, sorted(wanted)


def _target(path: str, meta, mine: dict[str, Any], wanted: set[str]):
    if path in wanted:
        x = mine[path]
        return jax.ShapeDtypeStruct(x.shape, meta.dtype, sharding=x.sharding)
    return ocp.PLACEHOLDER


def _restore_arg(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
    return ocp.RestoreArgs()
