"""Initial params from another workdir or checkpoint (`train.init_from`), e.g. LiT.

LiT locks an image tower that was trained elsewhere (an imported OpenAI /
open_clip checkpoint) and trains a text tower against it. Every param whose
path matches `train.init_from_keys` is taken from the source checkpoint (same
path, same shape required); the others keep their fresh init. The arrays are
restored straight onto this run's shardings. Position embeddings of another image
size or context length are resized (`clipjax.models.posembed`, as open_clip's
`resize_pos_embed`), with a log line; any other shape mismatch refuses, naming it.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import jax
import orbax.checkpoint as ocp

from clipjax import checkpoint, models
from clipjax.errors import ClipjaxError, ConfigError
from clipjax.models import posembed
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
        differ = {k for k in wanted if k in theirs
                  and tuple(theirs[k].shape) != tuple(mine[k].shape)}
        resized = {k for k in differ if posembed.is_resizable(k)
                   and _fits_resize(theirs[k].shape, mine[k].shape)}
        wrong = sorted(differ - resized)
        if missing or wrong:
            detail = (f"missing {missing[:5]}" if missing else "") + (
                f" shape differs for {wrong[:5]}" if wrong else "")
            raise ClipjaxError(f"train.init_from={source}: the checkpoint does not fit this "
                               f"model's {len(wanted)} params matching {keys!r}:{detail}")
        # Restore only what we take, each leaf onto its param's sharding.
        abstract = jax.tree_util.tree_map_with_path(
            lambda p, m: _target(path_str(p), m, mine, wanted, resized), meta)
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
    got = _resized(_flat(restored), mine, source)
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
    mine = _flat(params)
    theirs = _resized(_flat(convert(source)), {k: mine[k] for k in wanted}, workdir)
    bad = sorted(k for k in wanted if k not in theirs or theirs[k].shape != mine[k].shape)
    if bad:
        raise ClipjaxError(f"train.init_from={workdir}: the checkpoint does not fit this model's "
                           f"params matching {keys!r}: {bad[:5]}")
    out = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.device_put(theirs[path_str(p)].astype(x.dtype), x.sharding)
        if path_str(p) in wanted else x, params)
    return out, sorted(wanted)


def _fits_resize(theirs, mine) -> bool:
    return len(theirs) == len(mine) == 2 and theirs[1] == mine[1]


def _resized(got: dict[str, Any], mine: dict[str, Any], source: str) -> dict[str, Any]:
    """Position embeddings restored at their saved length, resized to this model's and
    placed on their param's sharding (the others pass through)."""
    shapes = {k: tuple(x.shape) for k, x in mine.items()}
    out, lines = posembed.resize_params(got, shapes)
    for line in lines:  # the user's record of what changed: always on stdout
        print(f"clipjax train: init_from {source}: resized {line}", flush=True)
    for k in {k for k in out if out[k] is not got[k]}:
        out[k] = jax.device_put(out[k], mine[k].sharding)
    return out


def _target(path: str, meta, mine: dict[str, Any], wanted: set[str], resized=frozenset()):
    if path in resized:  # its saved length, replicated; resized after the restore
        rep = jax.sharding.NamedSharding(mine[path].sharding.mesh, jax.sharding.PartitionSpec())
        return jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=rep)
    if path in wanted:
        x = mine[path]
        return jax.ShapeDtypeStruct(x.shape, meta.dtype, sharding=x.sharding)
    return ocp.PLACEHOLDER


def _restore_arg(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
    return ocp.RestoreArgs()
