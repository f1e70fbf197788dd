"""The workdir layout and orbax checkpoints: what the trainer writes and everyone reads.

    WORKDIR/config.json        the resolved config
    WORKDIR/checkpoints/STEP/  orbax Composite: params, train (opt_state, step, rng),
                               data (iterator state), metadata (JSON)
    WORKDIR/metrics.jsonl      one JSON object per logged step
    WORKDIR/tb/                TensorBoard events
    WORKDIR/eval/              evaluator results

Params live in their own item so that readers (the evaluator, `clipjax.load`,
export) restore them without the optimizer state, onto their own mesh.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from ml_collections import ConfigDict

from clipjax import config as config_lib
from clipjax.errors import ClipjaxError

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
ITEMS = ("params", "train", "data", "metadata")


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.fspath(workdir), CHECKPOINTS)


def write_config(workdir: str, config: ConfigDict) -> None:
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(config_lib.to_json(config))
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def read_config(workdir: str) -> ConfigDict:
    path = os.path.join(os.fspath(workdir), CONFIG_FILE)
    if not os.path.exists(path):
        raise ClipjaxError(f"{workdir}: no {CONFIG_FILE}; is this a clipjax workdir?")
    with open(path, encoding="utf-8") as f:
        return config_lib.from_json(f.read())


def manager(workdir: str, *, keep: int | None = None, keep_every: int | None = None,
            async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
    """The CheckpointManager over WORKDIR/checkpoints with clipjax's item layout."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        keep_period=keep_every or None,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=async_save,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def finalized_steps(workdir: str) -> list[int]:
    """Steps whose checkpoint is complete (orbax writes to a temp dir, then renames)."""
    root = checkpoint_dir(workdir)
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.isdigit() and os.path.isdir(path) and _is_finalized(path):
            steps.append(int(name))
    return sorted(steps)


def _is_finalized(path: str) -> bool:
    try:
        return ocp.utils.is_checkpoint_finalized(path)
    except Exception:  # an unreadable directory is not a finished checkpoint
        return False


def save_params(workdir: str, params: Any, config: ConfigDict, *, step: int = 0,
                metadata: Mapping[str, Any] | None = None) -> str:
    """Writes a params-only checkpoint (what `clipjax import` produces) and config.json."""
    write_config(workdir, config)
    mgr = manager(workdir, async_save=False)
    meta = {"step": int(step), "kind": "params", **(metadata or {})}
    mgr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), metadata=ocp.args.JsonSave(meta)), force=True)
    mgr.wait_until_finished()
    mgr.close()
    return os.path.join(checkpoint_dir(workdir), str(step))


def resolve(path: str, step: int | str | None = None) -> tuple[str, int]:
    """Accepts WORKDIR or WORKDIR/checkpoints/STEP; returns (workdir, step)."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if os.path.basename(parent) == CHECKPOINTS and os.path.basename(path).isdigit():
        return os.path.dirname(parent), int(os.path.basename(path))
    steps = finalized_steps(path)
    if not steps:
        raise ClipjaxError(f"{path}: no finalized checkpoint under {CHECKPOINTS}/")
    if step in (None, "latest"):
        return path, steps[-1]
    if int(step) not in steps:
        raise ClipjaxError(f"{path}: no checkpoint at step {step}; have {steps}")
    return path, int(step)


@contextlib.contextmanager
def _quiet_absl():
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def item_metadata(workdir: str, step: int, item: str) -> Any:
    """The array metadata (shapes, dtypes) an item of a checkpoint step was saved with.

    Read from the item's own directory: a CheckpointManager's view of it is None
    for a checkpoint that another (multi-process) run wrote.
    """
    path = os.path.join(checkpoint_dir(workdir), str(step), item)
    return ocp.StandardCheckpointer().metadata(path).item_metadata


def restore_params(workdir: str, step: int, abstract: Any | None = None) -> Any:
    """Restores only the params item.

    With `abstract` (a pytree of jax.ShapeDtypeStruct with shardings) the arrays
    land on the caller's mesh, whatever mesh wrote them; without it they land
    whole on the first local device.
    """
    with _quiet_absl():  # a read-only manager warns that it is read-only
        mgr = manager(workdir, read_only=True, async_save=False)
    try:
        if abstract is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                item_metadata(workdir, step, "params"))
        args = ocp.args.StandardRestore(abstract)
        with _quiet_absl():  # orbax warns about every item it was not asked to restore
            out = mgr.restore(step, args=ocp.args.Composite(params=args))
    except ClipjaxError:
        raise
    except Exception as e:
        raise ClipjaxError(f"{checkpoint_dir(workdir)}/{step}: cannot restore params: {e}") from e
    finally:
        mgr.close()
    return out["params"]
