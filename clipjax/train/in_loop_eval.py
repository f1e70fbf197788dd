"""Zero-shot evaluation inside the training process: `train.eval_every` with `eval.tasks`.

For a user with one accelerator host, who cannot run `clipjax eval --watch` beside
the run. Every `train.eval_every` steps (and at the last step) the live params are
scored on `eval.tasks` by the same `Evaluator` the separate process uses, so the
results land in the same files and TensorBoard tags: `eval/<task>/<step>.json`,
`eval/<task>/<metric>.png`, `tb/eval/` with tags `<task>/<metric>`. The steps and
seconds it takes are not counted as step time. Heavy suites belong in the separate
evaluator: this one pauses training while it runs.

Several processes: the params are gathered to every process (a collective, so all
of them call `maybe_run`), and process 0 evaluates and writes alone.
"""

from __future__ import annotations

import time

import jax
from ml_collections import ConfigDict

from clipjax.errors import ClipjaxError


class InLoopEval:
    def __init__(self, config: ConfigDict, workdir: str):
        self.every = int(config.train.get("eval_every", 0) or 0)
        self.workdir = workdir
        self.config = config
        self._evaluator = None
        self._plans: list = []
        if self.every and not config.eval.tasks:
            raise ClipjaxError("train.eval_every needs eval.tasks (e.g. "
                               "--config.eval.tasks=fashion_mnist)")

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def due(self, step: int, total: int) -> bool:
        return self.enabled and (step % self.every == 0 or step == total)

    def _get(self):
        if self._evaluator is None:
            from clipjax.evaluate import evaluator, suites, tasks

            e = self.config.eval
            task_text, self._plans = suites.expand(e.tasks, e.data_dir, log=self._log) \
                if any(s.strip() in suites.SUITES for s in e.tasks.split(",")) \
                else (e.tasks, [])
            opts = evaluator.options_from_config(self.config, tasks.parse_list(task_text),
                                                 progress=False, force=True)
            self._evaluator = evaluator.Evaluator(self.workdir, opts, log=self._log)
        return self._evaluator

    @staticmethod
    def _log(msg: str) -> None:
        print(f"clipjax train: eval: {msg}", flush=True)

    def run(self, step: int, params) -> float:
        """Scores `params` as step `step`; returns the seconds it took."""
        t0 = time.perf_counter()
        if not all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(params)):
            from jax.experimental import multihost_utils

            params = multihost_utils.process_allgather(params, tiled=True)
        if jax.process_index() == 0:
            from flax import linen as nn

            ev = self._get()
            # Outside the training mesh and its logical-axis rules: the evaluator's own
            # replicated encoders, exactly as in `clipjax eval`.
            with jax.set_mesh(None), nn.logical_axis_rules(()):
                out = ev.evaluate_params(step, jax.device_get(params))
            if self._plans:  # a suite in eval.tasks: its table, as `clipjax eval` writes it
                from clipjax.evaluate import suites

                suites.report(self.workdir, self._plans, {step: out}, log=self._log)
        return time.perf_counter() - t0

    def close(self) -> None:
        if self._evaluator is not None and self._evaluator._tb is not None:
            self._evaluator._tb.close()
            self._evaluator._tb = None
