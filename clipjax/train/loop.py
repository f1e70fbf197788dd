"""The training loop: mesh → input → sharded state (fresh or resumed) → steps → checkpoints.

Reads top to bottom like the run it drives. Everything that decides numbers
lives in `program` (pure, jitted); this module owns the side effects: the
data iterator, checkpoints, metrics, signals and the clock.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from clipjax import checkpoint, metrics, paths, sharding
from clipjax.errors import ClipjaxError, WorkerDied
from clipjax.train import program as program_lib
from clipjax.train import run_config, warmstart
from clipjax.train.checkpointing import Checkpointer
from clipjax.train.in_loop_eval import InLoopEval

log = logging.getLogger("clipjax.train")

EXIT_NONFINITE = 3  # `train.nonfinite='stop'` ended the run (after checkpointing)


class Preemption:
    """A preemption notice or a Ctrl-C → the loop checkpoints at an agreed step and exits.

    One process: SIGTERM or SIGINT (Ctrl-C) sets a flag; the loop saves after the step in
    flight and exits (0 after SIGTERM, as a preempted job that may restart; 130 after
    Ctrl-C, as an interrupted command). A second Ctrl-C raises KeyboardInterrupt at once,
    without saving. Several processes: JAX's distributed runtime has its own preemption
    service (it catches SIGTERM on any host and agrees on a step to save at, in the
    background): `reached_preemption_sync_point` is a local check, so no step pays for a
    collective; there a Ctrl-C interrupts as usual (no save).
    """

    EXIT_STATUS = {"SIGTERM": 0, "SIGINT": 130}

    def __init__(self):
        self.requested = False
        self.reason = "SIGTERM"  # the first signal received: what the exit message names
        self._previous: dict[int, Any] = {}
        self._service = jax.process_count() > 1 and _preemption_service()

    @property
    def exit_status(self) -> int:
        return self.EXIT_STATUS[self.reason]

    def __enter__(self):
        # With the runtime's service its SIGTERM handler is the runtime's, and a Ctrl-C on
        # one host could not be agreed on without a collective: it stays KeyboardInterrupt.
        signals = () if self._service else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.requested and self.reason == "SIGINT":
                raise KeyboardInterrupt  # the second Ctrl-C: abort now, no checkpoint
            sys.stderr.write("\nclipjax train: Ctrl-C: saving a checkpoint after this step, "
                             "then exiting (Ctrl-C again aborts without saving)\n")
            sys.stderr.flush()
        if not self.requested:
            self.reason = signal.Signals(signum).name
        self.requested = True

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            if previous is not None:
                signal.signal(sig, previous)

    def agreed(self, step: int) -> bool:
        """True at the step every process saves at after any was asked to stop. Called
        at every step by every process (the runtime's protocol needs each step id)."""
        if self._service:
            return multihost_utils.reached_preemption_sync_point(step)
        if jax.process_count() == 1:
            return self.requested
        # Several processes without the runtime's service: agree every PREEMPT_EVERY steps.
        if step % PREEMPT_EVERY:
            return False
        flags = multihost_utils.process_allgather(np.array(self.requested, np.int32))
        return bool(np.max(flags))


PREEMPT_EVERY = 10


def _preemption_service() -> bool:
    try:
        from jax._src import distributed

        return distributed.global_state.preemption_sync_manager is not None
    except (ImportError, AttributeError):
        return False


def _initial_state(program, config: ConfigDict):
    state = program.init()
    if config.train.init_from:
        params, taken = warmstart.load_initial_params(
            config.train.init_from, config.train.init_from_keys, state.params)
        # The optimizer state of fresh params is zeros: re-init it around the loaded params.
        state = state.replace(params=params)
        if state.ema is not None:  # the average starts at the loaded params
            from clipjax.train.state import copy_tree

            state = state.replace(ema=copy_tree(params))
        print(f"clipjax train: {len(taken)} params from {config.train.init_from}", flush=True)
    return state


def _peak(config: ConfigDict) -> metrics.Peak:
    try:
        return metrics.peak(config.train.peak_flops, config.model.dtype)
    except Exception as e:  # MFU is a report, never a reason to fail a run
        log.warning("cannot measure peak FLOP/s: %s", e)
        return metrics.Peak(math.nan, f"unknown: {e}", 1)


def _flops(config: ConfigDict, program) -> float:
    try:
        return metrics.model_flops_per_step(config, program.frozen_towers())
    except Exception as e:
        log.warning("cannot count model FLOPs: %s", e)
        return math.nan


def _resume_changes(config: ConfigDict, workdir: str) -> dict[str, tuple] | None:
    """The config changes of a resume (refusing those that may not change); None when
    the workdir holds no run to resume."""
    if not checkpoint.finalized_steps(workdir) or not paths.exists(
            paths.join(workdir, checkpoint.CONFIG_FILE)):
        return None
    return run_config.check_resume(checkpoint.read_config(workdir), config, workdir)


INDEX_CACHE = "index_cache"


def _remote_shards(train: ConfigDict) -> bool:
    from clipjax.data import sources as sources_lib

    sections = ([s for s, _ in sources_lib.mixture_components(train)]
                if train.source == "mixture" else [train])
    return any(s.get("source", train.source) == "webdataset"
               and any(paths.is_remote(u.strip()) for u in str(s.get("urls", "")).split("::"))
               for s in sections)


def _pipeline_config(config: ConfigDict, workdir: str) -> ConfigDict:
    """Remote webdataset shards without `data.index_cache` would be indexed by every
    process and decode worker (a full read of each shard): the run's own
    WORKDIR/index_cache then serves them all. config.json keeps the user's value."""
    if config.data.index_cache or not _remote_shards(config.data.train):
        return config
    out = ConfigDict(config.to_dict())
    out.data.index_cache = f"{workdir.rstrip('/')}/{INDEX_CACHE}"
    return out


def train(config: ConfigDict, workdir: str, *, progress: bool | None = None) -> int:
    """Runs (or resumes) training in `workdir`; returns the process exit status."""
    workdir = paths.to_str(workdir)  # a relative workdir means where the process started
    paths.writable_dir(workdir)
    changed = _resume_changes(config, workdir)  # before anything compiles or is read

    # ---- mesh and program
    mesh = sharding.make_mesh(config.mesh)
    program = program_lib.build(config, mesh)
    total = int(config.train.steps)
    batch_size = int(config.data.batch_size)

    # ---- input (this process's shard)
    from clipjax.data.pipeline import build_train_pipeline

    pipeline_config = _pipeline_config(config, workdir)

    def input_pipeline():
        return build_train_pipeline(pipeline_config, process_index=jax.process_index(),
                                    process_count=jax.process_count(), normalize=False)

    pipeline = input_pipeline()

    # ---- state: resume from the newest good checkpoint, else fresh (or warm-started)
    ckpt = Checkpointer(workdir, keep=int(config.train.keep),
                        keep_every=int(config.train.keep_every))
    state = ckpt.restore_latest(program.abstract_state, pipeline)
    if state is None:
        if ckpt.discarded:  # a failed restore may have moved the iterator: start it anew
            pipeline.close()
            pipeline = input_pipeline()
        state = _initial_state(program, config)
        start = 0
    else:
        start = int(jax.device_get(state.step))
        print(f"clipjax train: resumed from step {start}", flush=True)

    if start >= total:
        print(f"clipjax train: {workdir} is already at step {start} of {total}", flush=True)
        ckpt.close()
        return 0
    # config.json describes the run trained here: written only now that this config trains.
    if jax.process_index() == 0:
        if start > 0 and changed:
            run_config.record(workdir, start, changed)
        checkpoint.write_config(workdir, config)

    # ---- compile ahead of the loop, so step times exclude it
    t0 = time.perf_counter()
    compiled = program.lower(state).compile()
    compile_s = time.perf_counter() - t0
    flops_per_step = _flops(config, program)
    peak = _peak(config)
    num_devices = jax.device_count()
    print(f"clipjax train: mesh {dict(mesh.shape)}, {num_devices} devices, "
          f"{jax.process_count()} processes, compiled in {compile_s:.1f}s, "
          f"steps {start}..{total}; MFU peak {peak.describe()}", flush=True)

    writer = metrics.MetricsWriter(workdir, total_steps=total, start_step=start,
                                   progress=progress)
    status = 0
    step = start
    last_time, last_step, data_wait = time.perf_counter(), start, 0.0
    watch = _NonfiniteWatch() if config.train.nonfinite == "stop" else None
    in_loop_eval = InLoopEval(config, workdir)  # train.eval_every: zero-shot in this process

    def log(step: int, out: dict[str, Any]) -> None:
        nonlocal last_time, last_step, data_wait
        fetched = jax.device_get(out)
        now = time.perf_counter()
        fetched["param_norm"] = jax.device_get(program.param_norm(state.params))
        row = _row(fetched, step, step - last_step, now - last_time, data_wait,
                   batch_size, num_devices, flops_per_step, peak, pipeline.skipped)
        writer.write(step, row)
        # The next interval starts now: logging itself is not counted as step time.
        last_time, last_step, data_wait = time.perf_counter(), step, 0.0

    try:
        with Preemption() as preemption, program.context():
            while step < total:
                t_data = time.perf_counter()
                local = next(pipeline)
                data_wait += time.perf_counter() - t_data
                state, out = compiled(state, program.global_batch(local))
                step += 1
                writer.advance()
                log_due = step % config.train.log_every == 0 or step == total
                save_due = step % config.train.ckpt_every == 0 or step == total
                preempted = preemption.agreed(step) and step < total
                eval_due = in_loop_eval.due(step, total)

                if watch is not None:
                    watch.add(step, pipeline, out)
                    # Looked at only where something would log, save or evaluate the state.
                    looks = log_due or save_due or preempted or eval_due
                    bad = watch.first_nonfinite() if looks else None
                    if bad is not None:
                        bad_step, data_state, bad_out = bad
                        log(bad_step, bad_out)
                        pipeline.set_state(data_state)  # the input position after that step
                        ckpt.save(state, pipeline, force=True, metadata={"reason": "nonfinite"})
                        print(f"clipjax train: non-finite loss at step {bad_step}; saved the "
                              "last finite state and stopped (train.nonfinite='stop')",
                              flush=True)
                        status = EXIT_NONFINITE
                        break

                if log_due:
                    log(step, out)
                if save_due:
                    t_save = time.perf_counter()
                    ckpt.save(state, pipeline)
                    # Saving (the device→host copy; writing is async) is not step time.
                    last_time += time.perf_counter() - t_save
                if eval_due:  # not step time either
                    last_time += in_loop_eval.run(step, state.params)
                if preempted:
                    ckpt.save(state, pipeline, force=True, metadata={"reason": "preempted"})
                    print(f"clipjax train: {preemption.reason}: saved step {step}, exiting",
                          flush=True)
                    status = preemption.exit_status
                    break
    except WorkerDied:  # the state and the data position agree: keep them (one process)
        # (unless the state froze at a non-finite step: then the last checkpoint is the one)
        if jax.process_count() == 1 and (watch is None or watch.first_nonfinite() is None):
            print(f"clipjax train: a data worker died at step {step}: saving it, then "
                  "stopping", flush=True)
            if ckpt.save(state, pipeline, force=True, metadata={"reason": "data worker died"}):
                print(f"clipjax train: saved step {step} before stopping", flush=True)
        raise
    finally:
        ckpt.close()
        writer.close()
        in_loop_eval.close()
    return status


class _NonfiniteWatch:
    """`train.nonfinite='stop'` without a host sync per step: the step freezes the state
    after the first non-finite step, so the loop keeps each step's outputs (device arrays,
    not fetched) and input position, and looks at their `skipped` flags in one transfer
    only where it would log or save."""

    def __init__(self):
        self.pending: list[tuple[int, dict[str, Any], dict[str, Any]]] = []

    def add(self, step: int, pipeline, out: dict[str, Any]) -> None:
        self.pending.append((step, pipeline.get_state(), out))

    def first_nonfinite(self) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
        """(step, input state after it, its outputs) of the first non-finite step, if any."""
        pending, self.pending = self.pending, []
        flags = jax.device_get([out["skipped"] for _, _, out in pending])
        return next((p for p, bad in zip(pending, flags) if int(bad)), None)


def _row(m: dict[str, Any], step: int, steps: int, seconds: float, data_wait: float,
         batch_size: int, num_devices: int, flops_per_step: float, peak: metrics.Peak,
         skipped: dict[str, int]) -> dict[str, Any]:
    step_time = seconds / max(steps, 1)
    ips = batch_size / step_time if step_time > 0 else math.nan
    row = {
        "loss": m["loss"],
        "lr": m["lr"],
        "i2t_acc": m.get("i2t_acc"),
        "t2i_acc": m.get("t2i_acc"),
        "logit_scale": m.get("logit_scale"),
        "grad_norm": m["grad_norm"],
        "param_norm": m["param_norm"],
        "examples_seen": step * batch_size,
        "step_time": step_time,
        "data_wait": data_wait / max(steps, 1),
        "images_per_sec": ips,
        "images_per_sec_per_device": ips / num_devices,
        "mfu": peak.mfu(flops_per_step, step_time),
        "nonfinite_steps": m["nonfinite_steps"],
        "skipped_samples": int(sum(skipped.values())),
    }
    if "logit_bias" in m:
        row["logit_bias"] = m["logit_bias"]
    if "positives" in m:
        row["positives"] = m["positives"]
    for reason, count in sorted(skipped.items()):
        row[f"skipped/{reason}"] = int(count)
    return {k: v for k, v in row.items() if v is not None}


def run(config: ConfigDict, workdir: str) -> int:
    """Entry point for the CLI; a missing workdir parent etc. surfaces as ClipjaxError."""
    if not workdir:
        raise ClipjaxError("--workdir is required")
    return train(config, workdir)
