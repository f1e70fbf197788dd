"""Saving and resuming a training run: orbax items params/train/data/metadata.

Saves are asynchronous (the step loop continues while arrays stream to disk).
Resuming restores onto the current program's shardings, whatever mesh wrote
the checkpoint. A latest checkpoint that fails to restore (torn by a crash,
a file lost) is reported, moved aside to `STEP.corrupt-N`, and the previous
one is tried, so a run always continues from its newest good state.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from clipjax import checkpoint
from clipjax.errors import ClipjaxError
from clipjax.train.state import TrainState

log = logging.getLogger("clipjax.train")


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
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave(state.train_item()),
            data=pipeline.save_args(),
            metadata=ocp.args.JsonSave(meta))
        return self.mgr.save(step, args=args, force=force)

    def restore_latest(self, abstract: TrainState, pipeline) -> TrainState | None:
        """The newest checkpoint that restores, onto `abstract`'s shardings; None if none."""
        steps = checkpoint.finalized_steps(self.workdir)
        for step in reversed(steps):
            kind = self._kind(step)
            if kind == "params":
                raise ClipjaxError(
                    f"{checkpoint.checkpoint_dir(self.workdir)}/{step} holds params only (an "
                    "imported model); train in a new workdir with "
                    f"--config.train.init_from={self.workdir}")
            self._check_compatible(step, abstract)
            try:
                return self._restore(step, abstract, pipeline)
            except Exception as e:  # torn or unreadable: fall back to the previous one
                log.warning("checkpoint %s/%d does not restore (%s: %s); falling back to the "
                            "previous one", checkpoint.checkpoint_dir(self.workdir), step,
                            type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
                self._quarantine(step)
        return None

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
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract.params),
            train=ocp.args.StandardRestore(abstract.train_item()),
            data=pipeline.restore_args())
        out = self.mgr.restore(step, args=args)
        state = abstract.replace_from(out["params"], out["train"])
        if int(jax.device_get(state.step)) != step:
            raise ClipjaxError(f"checkpoint {step} holds state of step {int(state.step)}")
        return state

    def _quarantine(self, step: int) -> None:
        """Moves a bad checkpoint aside (process 0) so a later save of that step can happen."""
        multihost_utils.sync_global_devices(f"clipjax_quarantine_{step}_start")
        if jax.process_index() == 0:
            src = epath.Path(checkpoint.checkpoint_dir(self.workdir)) / str(step)
            n = 0
            while (dst := src.parent / f"{step}.corrupt-{n}").exists():
                n += 1
            src.rename(dst)
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
