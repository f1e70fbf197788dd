"""The evaluator process: follows a workdir's checkpoints and scores each on the tasks.

It only reads: config.json and finalized checkpoints (the params item alone,
restored onto the evaluator's own devices, whatever mesh wrote them). It
writes only under DIR/eval/ and DIR/tb/eval/. With `watch`, it polls for new
checkpoints and evaluates each as it appears, until none has appeared for
`watch_timeout` seconds or the run's final step (config.train.steps) is done.

DIR may be relative (resolved once, when the evaluator starts), absolute or a URI
(`gs://bucket/run`): every read and write goes through `clipjax.paths`, whose
listings are never served from a cache, so polling sees another host's new
checkpoints on an object store.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import itertools
import json
import sys
import time
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from clipjax import checkpoint as checkpoint_lib
from clipjax import config as config_lib
from clipjax import paths
from clipjax.errors import ClipjaxError
from clipjax.evaluate import datasets, linear_probe, results, retrieval, tasks, zeroshot
from clipjax.evaluate import encoder as encoder_lib
from clipjax.evaluate import suite_metrics as extra_metrics

CACHE_DIR = "cache"


@dataclasses.dataclass
class Options:
    tasks: list[tasks.Task]
    checkpoint: str = "latest"  # STEP | latest | all: which existing checkpoints to evaluate
    watch: bool = False
    watch_timeout: float = 3600.0
    poll_interval: float = 10.0
    data_dir: str = ""
    classnames: str = ""
    templates: str = ""
    batch_size: int = 256
    confusion_matrix: bool = False
    max_examples: int = 0  # 0 = the whole split
    linear_probe_max_train: int = 10000
    positives: str = "index"  # retrieval: index | caption (also identical captions, `_caption`)
    force: bool = False  # recompute results that exist already
    params: str = "raw"  # raw | ema (the params' moving average, train.ema_decay > 0)
    progress: bool | None = None  # None = a bar when stderr is a terminal


def options_from_config(config, task_list: list[tasks.Task] | None = None, **overrides) -> Options:
    """Options from `config.eval` (a config file) with CLI values on top."""
    e = config.eval
    opts = Options(
        tasks=task_list if task_list is not None else tasks.parse_list(e.tasks),
        checkpoint=str(e.checkpoint), watch=bool(e.watch), watch_timeout=float(e.watch_timeout),
        poll_interval=float(e.poll_interval), data_dir=e.data_dir, classnames=e.classnames,
        templates=e.templates, batch_size=int(e.batch_size),
        confusion_matrix=bool(e.confusion_matrix), max_examples=int(e.max_examples),
        linear_probe_max_train=int(e.linear_probe_max_train), positives=str(e.positives))
    for k, v in overrides.items():
        if v is not None:
            setattr(opts, k, v)
    return opts


class Evaluator:
    def __init__(self, workdir: str, options: Options, *, devices=None,
                 log: Callable[[str], None] | None = None):
        self.workdir = paths.to_str(workdir)
        _check_checkpoint_arg(options.checkpoint)
        self.opts = options
        self.log = log or (lambda msg: print(msg, flush=True))
        self.config = self._read_config()
        self.model_cfg = self.config.model
        self.mesh = encoder_lib.make_mesh(devices)
        self._sources: dict[tuple[str, str], datasets.Source] = {}
        self._tb: results.TensorBoard | None = None

    def _read_config(self):
        """config.json; with watch, waits for a training run that has not written it yet."""
        path = paths.join(self.workdir, checkpoint_lib.CONFIG_FILE)
        if self.opts.watch and not _exists_fresh(path):
            self.log(f"waiting for {path}")
            deadline = time.monotonic() + self.opts.watch_timeout
            while not _exists_fresh(path) and time.monotonic() < deadline:
                time.sleep(self.opts.poll_interval)
        return checkpoint_lib.read_config(self.workdir)

    # ------------------------------------------------------------------ following

    def run(self) -> dict[int, dict[str, dict]]:
        """Evaluates the chosen checkpoints (and, with watch, each new one); returns results."""
        out: dict[int, dict[str, dict]] = {}
        seen: set[int] = set()  # steps that existed at some poll
        handled: set[int] = set()  # steps evaluated or skipped
        steps = checkpoint_lib.finalized_steps(self.workdir)
        todo = self._initial(steps)
        seen.update(steps)
        last_new = time.monotonic()
        final = int(self.config.train.steps)
        try:
            while True:
                for step in todo:
                    res = self._evaluate_or_skip(step)
                    handled.add(step)
                    if res is not None:
                        out[step] = res
                if not self.opts.watch:
                    break
                if final in handled:
                    self.log(f"step {final} is the run's last (train.steps); stopping")
                    break
                if self.opts.checkpoint.isdigit() and int(self.opts.checkpoint) in handled:
                    break  # the one step asked for has been evaluated
                if time.monotonic() - last_new > self.opts.watch_timeout:
                    self.log(f"no new checkpoint for {self.opts.watch_timeout:g} s; stopping")
                    break
                time.sleep(self.opts.poll_interval)
                steps = checkpoint_lib.finalized_steps(self.workdir)
                todo = sorted(s for s in steps if s not in seen and self._wanted(s))
                seen.update(steps)
                if todo:
                    last_new = time.monotonic()
        finally:
            if self._tb is not None:
                self._tb.close()
        if self.opts.watch and not seen:
            raise ClipjaxError(
                f"{self.workdir}: no finalized checkpoint appeared within "
                f"{self.opts.watch_timeout:g} s")
        return out

    def _wanted(self, step: int) -> bool:
        c = self.opts.checkpoint
        return c in ("latest", "all") or int(c) == step

    def _initial(self, steps: list[int]) -> list[int]:
        c = self.opts.checkpoint
        if not steps:
            if self.opts.watch:
                where = checkpoint_lib.checkpoint_dir(self.workdir)
                self.log(f"waiting for checkpoints in {where}")
                return []
            raise ClipjaxError(
                f"{self.workdir}: no finalized checkpoint under {checkpoint_lib.CHECKPOINTS}/ "
                "(is training still starting? --watch waits for one)")
        if c == "all":
            return steps
        if c == "latest":
            return steps[-1:]
        if int(c) in steps:
            return [int(c)]
        if self.opts.watch:
            return []
        raise ClipjaxError(f"{self.workdir}: no finalized checkpoint at step {c}; have {steps}")

    def _evaluate_or_skip(self, step: int) -> dict[str, dict] | None:
        if not self.opts.force:
            have = [results.result_path(self.workdir, self._label(t), step)
                    for t in self.opts.tasks]
            if all(paths.exists(p) for p in have):
                self.log(f"step {step}: results exist in {results.EVAL_DIR}/ (--force recomputes)")
                return None
        try:
            return self.evaluate_step(step)
        except ClipjaxError as e:
            if not self.opts.watch:
                raise
            self.log(f"step {step}: skipped: {e}")  # e.g. deleted by keep-last-N meanwhile
            return None

    # ------------------------------------------------------------------ one checkpoint

    def encoder(self, params) -> encoder_lib.Encoder:
        """An encoder over these params (the compiled encoders are reused across steps)."""
        return encoder_lib.Encoder(self.config, params, batch_size=self.opts.batch_size,
                                   mesh=self.mesh)

    def evaluate_step(self, step: int) -> dict[str, dict]:
        t0 = time.perf_counter()
        try:
            params = encoder_lib.restore(self.workdir, step, self.model_cfg, self.mesh,
                                         which=self.opts.params)
        except checkpoint_lib.UnreadableCheckpoint as e:
            raise ClipjaxError(f"{e}; {self._earlier_good(step)}") from None
        self.log(f"step {step}: restored params in {time.perf_counter() - t0:.1f} s on "
                 f"{encoder_lib.device_summary(self.mesh)}")
        return self.evaluate_params(step, params)

    def evaluate_params(self, step: int, params) -> dict[str, dict]:
        """Scores `params` (a checkpoint's, or the training loop's live ones) as step `step`."""
        enc = self.encoder(params)
        out = {}
        self.opts.tasks = [self._resolve_mode(t) for t in self.opts.tasks]
        for task in self.opts.tasks:
            t1 = time.perf_counter()
            label = self._label(task)
            record = {"step": step, "task": task.label, "mode": task.mode,
                      "params": self.opts.params}
            enc.take_skipped()
            if task.mode == "zeroshot":
                record.update(self._zeroshot(task, step, enc))
            elif task.mode == "linear_probe":
                record.update(self._linear_probe(task, enc))
            else:
                record.update(self._retrieval(task, enc))
            # Unreadable images are left out and counted, as training does.
            skipped = enc.take_skipped()
            record["skipped"] = len(skipped)
            if skipped:
                record["skipped_reasons"] = dict(collections.Counter(e.reason for e in skipped))
                self.log(f"step {step} {task.label}: skipped {len(skipped)} unreadable "
                         f"image(s), e.g. {skipped[0]}")
            record["seconds"] = round(time.perf_counter() - t1, 3)
            cm, names = record.pop("_confusion", None), record.pop("_names", None)
            results.write_json(self.workdir, label, step, record)
            if cm is not None:
                results.plot_confusion(self.workdir, label, step, cm, names)
            self._tensorboard().write(label, record)
            results.plot(self.workdir, label)
            self.log(_summary(record))
            out[label] = record
        return out

    def _resolve_mode(self, task: tasks.Task) -> tasks.Task:
        """A task without @MODE on data that decides (wds:, tfds:): labels make it zero-shot,
        captions alone retrieval; said once, when it is decided."""
        if task.mode != tasks.AUTO:
            return task
        source = self._source(task, tasks.test_split(task))
        if source.kind == "classification":
            mode, why = "zeroshot", "the samples carry class labels"
        else:
            mode, why = "retrieval", "the samples carry captions and no class labels"
        self.log(f"task {task.label}: {why}: {mode} (add @MODE to choose)")
        return dataclasses.replace(task, mode=mode)

    def _earlier_good(self, step: int, tries: int = 3) -> str:
        """The advice after an unreadable checkpoint: the newest earlier step that restores."""
        earlier = [s for s in checkpoint_lib.finalized_steps(self.workdir) if s < step]
        for s in list(reversed(earlier))[:tries]:
            try:
                encoder_lib.restore(self.workdir, s, self.model_cfg, self.mesh,
                                    which=self.opts.params)
            except ClipjaxError:
                continue
            return f"evaluate the newest good one with --step {s}"
        if not earlier:
            return "no earlier checkpoint exists"
        return (f"the {min(tries, len(earlier))} before it fail too; pick one of "
                f"{earlier} with --step STEP")

    def _label(self, task: tasks.Task) -> str:
        """Where a task's results go: eval/TASK/ for the raw params, eval/TASK+ema/ for
        their EMA (so both can be kept side by side)."""
        return task.label if self.opts.params == "raw" else f"{task.label}+{self.opts.params}"

    def _tensorboard(self) -> results.TensorBoard:
        if self._tb is None:
            self._tb = results.TensorBoard(self.workdir)
        return self._tb

    def _source(self, task: tasks.Task, split: str) -> datasets.Source:
        key = (task.label, split)
        if key not in self._sources:
            self._sources[key] = tasks.load_source(task, split, self.opts.data_dir)
        return self._sources[key]

    def _examples(self, source: datasets.Source, limit: int, desc: str):
        n = len(source) if not limit else min(limit, len(source))
        bar = tqdm(total=n, desc=desc, unit="img", leave=False, file=sys.stderr,
                   disable=None if self.opts.progress is None else not self.opts.progress)
        return itertools.islice(iter(source), n), n, bar

    def _embed(self, enc, source, limit, desc):
        examples, n, bar = self._examples(source, limit, desc)
        embs, targets = [], []
        with bar:
            for emb, tgt in enc.encode_examples(examples, progress=bar):
                embs.append(emb)
                targets.extend(tgt)
        d = self.model_cfg.embed_dim
        return (np.concatenate(embs) if embs else np.zeros((0, d), np.float32)), targets

    def _zeroshot(self, task: tasks.Task, step: int, enc) -> dict:
        source = self._source(task, tasks.test_split(task))
        if source.kind != "classification":
            raise ClipjaxError(f"task {task.label}: zero-shot needs labelled data; "
                               f"{task.dataset} holds captions (use @retrieval)")
        names = tasks.classnames_for(task, source, self.opts.classnames)
        templates = tasks.templates_for(task, source, self.opts.templates)
        classifier = self._classifier(task, step, enc, names, templates)
        acc = zeroshot.Accumulator(len(names))
        extra = extra_metrics.for_task(task, source)  # DataComp's worst-group / F1 metrics
        examples, n, bar = self._examples(source, self.opts.max_examples, task.label)
        with bar:
            for emb, labels in enc.encode_examples(examples, progress=bar):
                try:
                    scores = zeroshot.logits(emb, classifier)
                    acc.update(scores, np.asarray(labels))
                except ValueError as e:
                    raise ClipjaxError(f"task {task.label}: {e} ({len(names)} class names)") \
                        from None
                if extra is not None:
                    extra.update(scores, labels)
        record = {"num_examples": acc.count, "num_classes": len(names),
                  "num_templates": len(templates), **acc.metrics()}
        if extra is not None:
            record.update(extra.metrics(acc.cm))
        if self.opts.confusion_matrix:
            record["_confusion"], record["_names"] = acc.cm, names
        return record

    def _classifier(self, task, step, enc, names, templates) -> np.ndarray:
        """The ensembled class embeddings, cached per (checkpoint, task, prompts)."""
        key = hashlib.sha1(json.dumps(
            [names, templates, config_lib.to_json(self.config)]).encode()).hexdigest()[:16]
        path = paths.join(self.workdir, results.EVAL_DIR, CACHE_DIR, self._label(task),
                          f"{step}-{key}.npy")
        if path.exists():
            return np.load(io.BytesIO(paths.read_bytes(path)))
        classifier = zeroshot.build_classifier(enc.encode_texts, names, templates)
        buf = io.BytesIO()
        np.save(buf, classifier)
        paths.write_bytes(path, buf.getvalue())
        return classifier

    def _linear_probe(self, task: tasks.Task, enc) -> dict:
        train = self._source(task, "train")
        test = self._source(task, tasks.test_split(task))
        if train.kind != "classification":
            raise ClipjaxError(f"task {task.label}: a linear probe needs labelled data")
        train_x, train_y = self._embed(enc, train, self.opts.linear_probe_max_train,
                                       f"{task.label} train")
        test_x, test_y = self._embed(enc, test, self.opts.max_examples, f"{task.label} test")
        train_y, test_y = np.asarray(train_y), np.asarray(test_y)
        num_classes = int(max(train_y.max(), test_y.max())) + 1
        if train.classnames:
            num_classes = max(num_classes, len(train.classnames))
        out = linear_probe.evaluate(train_x, train_y, test_x, test_y, num_classes)
        return {"num_examples": len(test_y), "num_train": len(train_y),
                "num_classes": num_classes, **out}

    def _retrieval(self, task: tasks.Task, enc) -> dict:
        source = self._source(task, tasks.test_split(task))
        if source.kind != "retrieval":
            raise ClipjaxError(f"task {task.label}: retrieval needs captioned data; "
                               f"{task.dataset} holds class labels")
        image_emb, captions = self._embed(enc, source, self.opts.max_examples, task.label)
        texts = [c for caps in captions for c in caps]
        text_image = [i for i, caps in enumerate(captions) for _ in caps]
        text_emb = enc.encode_texts(texts)
        groups = retrieval.caption_groups(texts) if self.opts.positives == "caption" else None
        return {"num_examples": len(image_emb), "num_texts": len(texts),
                **retrieval.recall_at_k(image_emb, text_emb, text_image, groups=groups)}


def _exists_fresh(path) -> bool:
    """Whether `path` exists now (a remote parent's listing cache is dropped first)."""
    paths.invalidate_cache(paths.resolve(path).parent)
    return paths.exists(path)


def _check_checkpoint_arg(c: str) -> None:
    if c not in ("latest", "all") and not (c.isdigit()):
        raise ClipjaxError(f"--checkpoint must be a step number, 'latest' or 'all'; got {c!r}")


def _summary(record: dict) -> str:
    """Every metric the JSON holds (fractions as %), then the linear probe's chosen L2."""
    metrics = "  ".join(f"{m} {100 * record[m]:.2f}%" for m in results.metric_names(record))
    if "l2" in record:
        metrics += f"  l2 {record['l2']:g}"
    skipped = f", {record['skipped']} skipped" if record.get("skipped") else ""
    probe = f", the probe fit on {record['num_train']}" if "num_train" in record else ""
    return (f"step {record['step']} {record['task']}: {metrics}  "
            f"({record['num_examples']} images{skipped}{probe}, {record['seconds']:.1f} s)")
