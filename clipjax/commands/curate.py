"""The `clipjax data score|filter|dedup` actions: arguments in, `clipjax.curation` does the work."""

from __future__ import annotations

import json
import sys

from clipjax.errors import ClipjaxError

_RUNTIME_KEYS = ("distributed", "coordinator_address", "num_processes", "process_id")


def run(args) -> int:
    return {"score": _score, "filter": _filter, "dedup": _dedup}[args.action](args)


def runtime_config(config_args):
    """The `--config.runtime.*` overrides (what launch/ passes to every process) as the
    training runtime section; any other --config argument is an error here."""
    from clipjax.config import default_config

    rt = default_config().runtime
    for a in config_args or ():
        key, _, value = a.removeprefix("--config.").partition("=")
        name = key.removeprefix("runtime.")
        if not key.startswith("runtime.") or name not in _RUNTIME_KEYS:
            raise ClipjaxError(f"{a.split('=')[0]}: `data score` takes only "
                               f"--config.runtime.{{{','.join(_RUNTIME_KEYS)}}}")
        try:
            rt[name] = type(rt[name])(value)
        except ValueError:
            raise ClipjaxError(f"--config.runtime.{name}: not a valid value: {value!r}") from None
    if rt.distributed not in ("auto", "on", "off"):
        raise ClipjaxError(f"--config.runtime.distributed must be auto, on or off; "
                           f"got {rt.distributed!r}")
    return rt


def _urls(pattern: str) -> list[str]:
    from clipjax import paths
    from clipjax.data import webdataset as wds

    urls = [paths.canonical(u) for u in wds.expand_urls(pattern)]
    wds.check_urls_exist(urls)
    return urls


def _score(args) -> int:
    from clipjax.evaluate.xla_flags import tune_cpu_flags

    tune_cpu_flags()  # inference on CPU: as `clipjax eval` (before JAX starts its backend)
    import jax

    from clipjax import runtime
    from clipjax.curation import score

    rt = runtime_config(args.config_args)
    if args.batch_size < 1:
        raise ClipjaxError(f"--batch-size must be positive; got {args.batch_size}")
    urls = _urls(args.shards)
    distributed = runtime.initialize_distributed(rt)
    index, count = jax.process_index(), jax.process_count()
    from clipjax import inference

    model = inference.load(args.model, args.step, batch_size=args.batch_size)
    mine = score.assign(urls, index, count)
    info = {"model": str(model.workdir), "step": model.step, "embed_dim": model.embed_dim,
            "process": index}

    def progress(url, n, skipped):
        extra = f", skipped {skipped}" if skipped else ""
        print(f"[process {index}] {url}: {n} pairs{extra}", file=sys.stderr, flush=True)

    report = score.score_shards(
        model, mine, args.out, batch_size=args.batch_size, embeddings=args.embeddings,
        workers=args.workers, max_pixels=args.max_image_pixels or score.samples_lib.
        DEFAULT_MAX_PIXELS, model_info=info, progress=progress)
    out = {"process": index, "processes": count, "shards": len(mine), **report.as_dict()}
    print(json.dumps(out), flush=True)
    if distributed:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("clipjax data score done")
    return 0


def _filter(args) -> int:
    from clipjax.curation import filter as filter_lib
    from clipjax.curation import rules

    exclude = filter_lib.read_exclude(args.exclude) if args.exclude else frozenset()
    r = rules.Rules(min_score=args.min_score, keep_fraction=args.keep_fraction,
                    min_caption_words=args.min_caption_words, english=args.english,
                    exclude=exclude)
    report = filter_lib.filter_shards(args.scores, _urls(args.shards), args.out, r,
                                      shard_size=args.shard_size)
    print(json.dumps(report))
    if not report["kept"]:
        print("clipjax data filter: warning: no sample was kept", file=sys.stderr)
    return 0


def _dedup(args) -> int:
    from clipjax.curation import dedup
    from clipjax.evaluate.xla_flags import tune_cpu_flags

    tune_cpu_flags()

    try:
        crops = tuple(float(c) for c in args.crops.split(",") if c.strip())
    except ValueError:
        raise ClipjaxError(f"--crops: comma-separated fractions, not {args.crops!r}") from None
    features = args.features or ("clip" if args.model else "pixels")
    model = None
    if features == "clip" and args.model:
        from clipjax import inference

        model = inference.load(args.model, args.step)
    describe = dedup.Describer(features, model)
    urls = _urls(args.shards)
    rows, report = dedup.find_duplicates(
        urls, dedup.eval_images(args.against, args.split, args.data_dir), describe,
        args.threshold, crops)
    dedup.write_list(args.out, rows)
    report["out"] = args.out
    print(json.dumps(report))
    return 0
