"""Saving and resuming a training run: orbax items params/train/data/metadata.

Saves are asynchronous (the step loop continues while arrays stream to disk).
Resuming restores onto the current program's shardings, whatever mesh wrote
the checkpoint. A good checkpoint is never thrown away:

- only evidence of corruption (a file of the checkpoint missing, an item that
  fails to decode) moves a checkpoint aside to `STEP.corrupt-N`, and the
  previous one is tried;
- a transient I/O error (the storage server unreachable, a timeout) is retried
  with backoff;
- anything else (permission denied, out of memory, a data-iterator state of
  another shape because `data.workers` changed, ...) stops the run with a
  message naming the cause and the checkpoint, and moves nothing.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from clipjax import checkpoint, paths
from clipjax.errors import ClipjaxError
from clipjax.train import state as state_lib
from clipjax.train.state import TrainState

log = logging.getLogger("clipjax.train")

CORRUPT, TRANSIENT, FATAL = "corrupt", "transient", "fatal"
RETRY_DELAYS_S = (1, 2, 4, 8, 16)  # ~31 s of outage survived on top of the clients' own retries

# Words in an error (or its causes) that say what kind of failure it is. tensorstore and
# orbax raise ValueError / RuntimeError carrying absl status codes; gcsfs and the OS raise
# typed exceptions. Evidence of corruption must be positive: an unknown error is FATAL.
_TRANSIENT_WORDS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "Connection refused", "connection reset",
                    "Cannot connect", "Couldn't connect", "Timeout", "timed out",
                    "Temporary failure", "Server disconnected", "ABORTED")
_FATAL_WORDS = ("PERMISSION_DENIED", "Permission denied", "Forbidden", "RESOURCE_EXHAUSTED",
                "Out of memory", "UNAUTHENTICATED", "Unauthorized")
_CORRUPT_WORDS = ("NOT_FOUND", "No such file", "not found", "DATA_LOSS", "Error decoding",
                  "checksum", "Unexpected end", "truncated", "corrupt", "Not a directory",
                  "Invalid manifest", "Error reading")


def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def classify_restore_error(exc: BaseException) -> str:
    """CORRUPT, TRANSIENT or FATAL for an exception raised while restoring a checkpoint."""
    chain = _chain(exc)
    text = " | ".join(f"{type(e).__name__}: {e}" for e in chain)
    if any(isinstance(e, PermissionError | MemoryError) for e in chain):
        return FATAL
    if any(w.lower() in text.lower() for w in _FATAL_WORDS):
        return FATAL
    if any(isinstance(e, ConnectionError | TimeoutError) for e in chain):
        return TRANSIENT
    try:
        import aiohttp

        if any(isinstance(e, aiohttp.ClientError) for e in chain):
            return TRANSIENT
    except ImportError:  # no gcsfs, hence no aiohttp: nothing remote to retry
        pass
    if any(w.lower() in text.lower() for w in _TRANSIENT_WORDS):
        return TRANSIENT
    if any(isinstance(e, FileNotFoundError | json.JSONDecodeError) for e in chain):
        return CORRUPT
    if any(w.lower() in text.lower() for w in _CORRUPT_WORDS):
        return CORRUPT
    return FATAL


def _cause(exc: BaseException) -> str:
    chain = _chain(exc)
    last = chain[-1]
    first_line = (str(last).splitlines() or [""])[0][:600]
    return f"{type(last).__name__}: {first_line}"


class Checkpointer:
    """The run's CheckpointManager with clipjax's save/resume policy."""

    def __init__(self, workdir: str, *, keep: int, keep_every: int, async_save: bool = True):
        self.workdir = workdir
        self.mgr = checkpoint.manager(workdir, keep=keep, keep_every=keep_every,
                                      async_save=async_save)

    def save(self, state: TrainState, pipeline, *, force: bool = False,
             metadata: dict[str, Any] | None = None) -> bool:
        step = int(jax.device_get(state.step))
        if step in self.mgr.all_steps():
            return False
        meta = {"step": step, "kind": "train", "time": time.time(), **(metadata or {})}
        items = dict(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave(state.train_item()),
            data=pipeline.save_args(),
            metadata=ocp.args.JsonSave(meta))
        if state.ema is not None:
            items["ema"] = ocp.args.StandardSave(state.ema)
        return self.mgr.save(step, args=ocp.args.Composite(**items), force=force)

    def restore_latest(self, abstract: TrainState, pipeline) -> TrainState | None:
        """The newest checkpoint that restores, onto `abstract`'s shardings; None if none.

        `self.discarded` lists the steps moved aside as corrupt; after any, `pipeline`
        may hold a position a failed restore left in it: the caller rebuilds it.
        """
        self.discarded: list[int] = []
        steps = checkpoint.finalized_steps(self.workdir)
        for step in reversed(steps):
            self._check_readable(step)
            kind = self._kind(step)
            if kind == "params":
                raise ClipjaxError(
                    f"{checkpoint.checkpoint_dir(self.workdir)}/{step} holds params only (an "
                    "imported model); train in a new workdir with "
                    f"--config.train.init_from={self.workdir}")
            self._check_compatible(step, abstract)
            self._check_data_state(step, pipeline)
            try:
                return self._restore_retrying(step, abstract, pipeline)
            except ClipjaxError:
                raise
            except Exception as e:
                where = checkpoint.step_dir(self.workdir, step)
                if classify_restore_error(e) != CORRUPT:
                    raise ClipjaxError(
                        f"{where}: cannot restore ({_cause(e)}); nothing was moved or "
                        "deleted. Fix the cause and run again.") from e
                log.warning("checkpoint %s is corrupt (%s); moving it aside and trying the "
                            "previous one", where, _cause(e))
                self._quarantine(step)
                self.discarded.append(step)
        return None

    def _restore_retrying(self, step: int, abstract: TrainState, pipeline) -> TrainState:
        for attempt, delay in enumerate((*RETRY_DELAYS_S, None)):
            try:
                return self._restore(step, abstract, pipeline)
            except ClipjaxError:
                raise
            except Exception as e:
                if delay is None or classify_restore_error(e) != TRANSIENT:
                    raise
                log.warning("restoring %s failed (%s); retry %d in %d s",
                            checkpoint.step_dir(self.workdir, step), _cause(e), attempt + 1,
                            delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _check_readable(self, step: int) -> None:
        """A local file this process may not read stops the run before orbax starts its
        reads (which would fail the same way, but from inside a dozen async tasks)."""
        root = checkpoint.step_dir(self.workdir, step)
        if paths.is_remote(root):
            return  # a bucket's permissions show in its listing and in the restore's error
        for f in paths.walk_files(root):
            try:
                with paths.open(f, "rb"):
                    pass
            except PermissionError as e:
                raise ClipjaxError(
                    f"{root}: cannot restore (PermissionError: {f} is not readable by this "
                    "user); nothing was moved or deleted. Fix the permissions and run "
                    "again.") from e

    def _check_data_state(self, step: int, pipeline) -> None:
        """A data-iterator state of another structure (one an older clipjax wrote, whose
        state depended on `data.workers`) cannot restore into this pipeline: refuse,
        clearly, instead of failing inside the iterator with a KeyError."""
        mine = getattr(pipeline, "get_state", None)
        if mine is None:
            return
        try:
            data_dir = posixpath.join(checkpoint.step_dir(self.workdir, step), "data")
            names = [n for n in paths.listdir(data_dir) if n.endswith(".json")]
            if not names:
                return
            saved = json.loads(paths.read_text(posixpath.join(data_dir, names[0])))
            if isinstance(saved, str):  # grain writes its state as a JSON string
                saved = json.loads(saved)
        except Exception:  # unreadable: the restore itself will say what is wrong
            return
        theirs, ours = _structure(saved), _structure(json.loads(json.dumps(mine())))
        if theirs != ours:
            raise ClipjaxError(
                f"{checkpoint.step_dir(self.workdir, step)}: its data-iterator state has "
                "another shape than this run's input pipeline (written by an older clipjax "
                "with other data.workers?); resume with the values in "
                f"{self.workdir}/config.json. Nothing was moved or deleted.")

    def _kind(self, step: int) -> str | None:
        """The metadata item's "kind" ("train" or "params"); None when it cannot be read."""
        try:
            out = self.mgr.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
            return out["metadata"].get("kind")
        except Exception:
            return None

    def _check_compatible(self, step: int, abstract: TrainState) -> None:
        """A readable checkpoint of another model or optimizer is the user's mistake, not
        corruption: refuse to resume (and never move it aside)."""
        try:
            saved_params = checkpoint.item_metadata(self.workdir, step, "params")
            saved_train = checkpoint.item_metadata(self.workdir, step, "train")
        except Exception:  # unreadable metadata: let the restore decide (and fall back)
            return
        if saved_params is None or saved_train is None:
            return
        mine, theirs = _shapes(abstract.params), _shapes(saved_params)
        if mine != theirs:
            diff = sorted(set(mine.items()) ^ set(theirs.items()))[:3]
            raise ClipjaxError(
                f"{checkpoint.checkpoint_dir(self.workdir)}/{step} holds a different model "
                f"(params differ: {diff}); resume with the config in "
                f"{self.workdir}/config.json, or use a new --workdir (train.init_from can "
                "take params from this one)")
        mine_opt = sorted(_shapes(abstract.train_item()).values())
        theirs_opt = sorted(_shapes(saved_train).values())
        if mine_opt != theirs_opt:
            raise ClipjaxError(
                f"{checkpoint.checkpoint_dir(self.workdir)}/{step} holds another optimizer "
                "state (optim.name / optim.frozen changed?); resume with the config in "
                f"{self.workdir}/config.json, or use a new --workdir")

    def _restore(self, step: int, abstract: TrainState, pipeline) -> TrainState:
        items = dict(
            params=ocp.args.StandardRestore(abstract.params),
            train=ocp.args.StandardRestore(abstract.train_item()),
            data=pipeline.restore_args())
        has_ema = paths.exists(posixpath.join(checkpoint.step_dir(self.workdir, step), "ema"))
        if abstract.ema is not None and has_ema:
            items["ema"] = ocp.args.StandardRestore(abstract.ema)
        out = self.mgr.restore(step, args=ocp.args.Composite(**items))
        ema = out.get("ema") if "ema" in items else None
        if abstract.ema is not None and ema is None:
            # A run that trained without an EMA turns it on: the average starts here.
            log.info("checkpoint %d has no EMA; train.ema_decay starts it from its params", step)
            ema = state_lib.copy_tree(out["params"])
        state = abstract.replace_from(out["params"], out["train"], ema)
        if int(jax.device_get(state.step)) != step:
            raise ClipjaxError(f"checkpoint {step} holds state of step {int(state.step)}")
        return state

    def _quarantine(self, step: int) -> None:
        """Moves a bad checkpoint aside (process 0) so a later save of that step can happen."""
        multihost_utils.sync_global_devices(f"clipjax_quarantine_{step}_start")
        if jax.process_index() == 0:
            src = paths.resolve(checkpoint.step_dir(self.workdir, step))
            n = 0
            while (dst := src.parent / f"{step}.corrupt-{n}").exists():
                n += 1
            _move(src, dst)
            log.warning("moved it to %s", dst)
        multihost_utils.sync_global_devices(f"clipjax_quarantine_{step}_done")
        self.mgr.reload()

    def wait(self) -> None:
        self.mgr.wait_until_finished()

    def close(self) -> None:
        self.mgr.wait_until_finished()
        self.mgr.close()


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """path -> shape of every array leaf (abstract arrays or orbax metadata)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape)
            for p, x in flat if hasattr(x, "shape")}


def _structure(tree: Any) -> Any:
    """The keys of a JSON state, recursively (values and list lengths ignored)."""
    if isinstance(tree, dict):
        return {k: _structure(v) for k, v in sorted(tree.items()) if k not in ("skipped",
                                                                                "first_bad")}
    return type(tree).__name__ if not isinstance(tree, list) else "list"


def _move(src, dst) -> None:
    """A rename locally; on an object store (no renames) a copy of every object, then a
    delete, so a crash in between leaves both (never neither)."""
    if not paths.is_remote(src):
        src.rename(dst)
        return
    for f in paths.walk_files(src):
        rel = str(f)[len(str(src)):].lstrip("/")
        paths.write_bytes(dst / rel, f.read_bytes())
    src.rmtree()
