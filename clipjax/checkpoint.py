"""The workdir layout and orbax checkpoints: what the trainer writes and everyone reads.

    WORKDIR/config.json        the resolved config
    WORKDIR/checkpoints/STEP/  orbax Composite: params, train (opt_state, step, rng),
                               data (iterator state), metadata (JSON), ema (the
                               params' moving average, when train.ema_decay > 0)
    WORKDIR/metrics.jsonl      one JSON object per logged step
    WORKDIR/tb/                TensorBoard events
    WORKDIR/eval/              evaluator results

Params live in their own item so that readers (the evaluator, `clipjax.load`,
export) restore them without the optimizer state, onto their own mesh.

WORKDIR may be relative, absolute or a URI (`gs://bucket/run`): every function
here resolves it through `clipjax.paths` first, so a relative workdir means the
directory it named when the process started, and orbax gets the absolute path
it insists on.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from ml_collections import ConfigDict

from clipjax import config as config_lib
from clipjax import paths
from clipjax.errors import ClipjaxError

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
ITEMS = ("params", "train", "data", "metadata", "ema")  # "ema": train.ema_decay > 0
PARAM_ITEMS = {"raw": "params", "ema": "ema"}  # --params raw|ema -> the item holding them


def checkpoint_dir(workdir: str) -> str:
    return os.fspath(paths.join(workdir, CHECKPOINTS))


def step_dir(workdir: str, step: int) -> str:
    return os.fspath(paths.join(workdir, CHECKPOINTS, str(step)))


def write_config(workdir: str, config: ConfigDict) -> None:
    paths.write_text(paths.join(workdir, CONFIG_FILE), config_lib.to_json(config))


def read_config(workdir: str) -> ConfigDict:
    path = paths.join(workdir, CONFIG_FILE)
    if not path.exists():
        raise ClipjaxError(f"{workdir}: no {CONFIG_FILE}; is this a clipjax workdir?")
    return config_lib.from_json(path.read_text(encoding="utf-8"))


# Orbax splits each replicated array over its replicas so that each writes a slice: an
# eager device slice per array and replica, each compiled on first use, worth it for big
# arrays only. Arrays whose slices would be under 1 MiB are written whole by their first
# replica, as without replicas (60 replicated arrays of 4-64 KiB on 8 CPU devices: the
# first save 5.7 -> 0.25 s, later ones 0.4 -> 0.2 s; the files are the same).
MIN_SLICE_BYTES = 1 << 20


@functools.cache  # orbax's handler registry is global: registered once per process
def _write_small_arrays_whole() -> None:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES), override=True)


def manager(workdir: str, *, keep: int | None = None, keep_every: int | None = None,
            async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
    """The CheckpointManager over WORKDIR/checkpoints with clipjax's item layout."""
    _write_small_arrays_whole()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        keep_period=keep_every or None,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=async_save,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def finalized_steps(workdir: str) -> list[int]:
    """Steps whose checkpoint is complete (orbax writes to a temp dir, then renames, or on
    an object store writes a commit marker last)."""
    root = checkpoint_dir(workdir)
    steps = []
    for name in paths.listdir(root):
        if name.isdigit() and _is_finalized(posixpath.join(root, name)):
            steps.append(int(name))
    return sorted(steps)


def _is_finalized(path: str) -> bool:
    try:
        return paths.is_dir(path) and ocp.utils.is_checkpoint_finalized(path)
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
    return step_dir(workdir, step)


def resolve(path: str, step: int | str | None = None) -> tuple[str, int]:
    """Accepts WORKDIR or WORKDIR/checkpoints/STEP (relative, absolute or a URI); returns
    (workdir, step) with the workdir absolute (or the URI)."""
    resolved = paths.resolve(path)
    if resolved.parent.name == CHECKPOINTS and resolved.name.isdigit():
        return os.fspath(resolved.parent.parent), int(resolved.name)
    path = os.fspath(resolved)
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
    path = posixpath.join(step_dir(workdir, step), item)
    with _quiet_absl():  # orbax warns that an item directory has no step-level metadata
        return ocp.StandardCheckpointer().metadata(path).item_metadata


def has_ema(workdir: str, step: int) -> bool:
    return paths.exists(posixpath.join(step_dir(workdir, step), "ema"))


def params_item(which: str) -> str:
    """'raw' -> "params", 'ema' -> "ema" (the item a `--params` choice restores)."""
    if which not in PARAM_ITEMS:
        raise ClipjaxError(f"params must be 'raw' or 'ema'; got {which!r}")
    return PARAM_ITEMS[which]


def restore_params(workdir: str, step: int, abstract: Any | None = None,
                   which: str = "raw") -> Any:
    """Restores only the params item (`which='ema'`: their EMA, train.ema_decay > 0).

    With `abstract` (a pytree of jax.ShapeDtypeStruct with shardings) the arrays
    land on the caller's mesh, whatever mesh wrote them; without it they land
    whole on the first local device.
    """
    item = params_item(which)
    if item == "ema" and not has_ema(workdir, step):
        raise ClipjaxError(
            f"{checkpoint_dir(workdir)}/{step} holds no EMA of the params (it was trained "
            "with train.ema_decay=0); use the raw params")
    with _quiet_absl():  # a read-only manager warns that it is read-only
        mgr = manager(workdir, read_only=True, async_save=False)
    try:
        if abstract is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                item_metadata(workdir, step, item))
        args = ocp.args.StandardRestore(abstract)
        with _quiet_absl():  # orbax warns about every item it was not asked to restore
            out = mgr.restore(step, args=ocp.args.Composite(**{item: args}))
    except ClipjaxError:
        raise
    except Exception as e:
        raise UnreadableCheckpoint(
            f"{checkpoint_dir(workdir)}/{step}: cannot restore params: {short_error(e)}",
            step) from e
    finally:
        mgr.close()
    return out[item]


class UnreadableCheckpoint(ClipjaxError):
    """A checkpoint step whose params do not restore (`step` says which)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def short_error(exc: BaseException, limit: int = 400) -> str:
    """The innermost cause of a restore error, in one line: tensorstore's own status text
    names the file ("Error reading ... at local file ..."), where the outer orbax error
    holds a TensorStore spec repr."""
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    text = str(chain[-1]).split(" See full TensorStore details")[0]
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
