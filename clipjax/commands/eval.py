"""`clipjax eval`: zero-shot classification, linear probe and retrieval over a workdir's
checkpoints, as a separate process that can follow a training run (--watch)."""

from __future__ import annotations

import argparse

from clipjax.commands import flags

HELP = "evaluate checkpoints zero-shot (classification, retrieval, linear probe)"
TAKES_CONFIG = True  # receives --config / --config.k=v (clipjax/cli.py)


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags.add_workdir(p, help="a training or `clipjax import` workdir, relative, absolute or "
                              "gs:// (reads config.json and checkpoints/, writes eval/ and "
                              "tb/eval/)")
    flags.add_step(p, dest="checkpoint", choices="latest|all",
                   help="which existing checkpoints to evaluate (default: latest)")
    p.add_argument("--watch", action="store_true", default=None,
                   help="keep polling and evaluate each new checkpoint as it is finalized")
    p.add_argument("--watch-timeout", type=float, default=None, metavar="S",
                   help="with --watch: stop after S seconds without a new checkpoint "
                        "(default 3600)")
    p.add_argument("--poll-interval", type=float, default=None, metavar="S",
                   help="with --watch: seconds between looks at checkpoints/ (default 10)")
    p.add_argument("--tasks", default=None, metavar="NAME[,NAME...]",
                   help="built-in tasks (--tasks help lists them) or SOURCE:PATH tasks, "
                        "e.g. fashion_mnist,cifar10@linear_probe,pets=folder:/data/pets; "
                        "or a suite, datacomp or clip_benchmark, read from --data-dir")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="where built-in tasks find their data: IDX files, CLIP_benchmark wds, "
                        "class folders, or a TFDS data_dir")
    p.add_argument("--classnames", default=None, metavar="FILE",
                   help="class names, one per line in label order (or a JSON list)")
    p.add_argument("--templates", default=None, metavar="FILE",
                   help="prompt templates, one per line with {} for the class name (or a "
                        "JSON list, or a built-in set name such as imagenet1k_simple)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="images per batch, split over the devices (default 256)")
    p.add_argument("--max-examples", type=int, default=None, metavar="N",
                   help="evaluate only the first N examples of each split (0 = all)")
    p.add_argument("--confusion-matrix", action="store_true", default=None,
                   help="also write eval/<task>/confusion_<step>.png")
    p.add_argument("--positives", choices=("index", "caption"), default=None,
                   help="retrieval: 'caption' also reports R@K (suffix _caption) where a hit "
                        "is any image/caption with an identical caption (default: index)")
    p.add_argument("--force", action="store_true",
                   help="recompute results that exist already")
    p.add_argument("--params", default=None, choices=("raw", "ema"),
                   help="the trained params (raw, default) or their moving average (ema; "
                        "a run with train.ema_decay > 0); ema results go to eval/<task>+ema/")
    flags.add_progress(p)
    p.epilog = ("Also takes --config configs/eval/x.py [--config.eval.k=v ...]: the config's "
                "eval section supplies any option not given on the command line.")


def _list_tasks() -> str:
    from clipjax.evaluate import prompts, tasks

    lines = ["built-in tasks (zero-shot; add @linear_probe for a linear probe):"]
    for name, b in sorted(tasks.BUILTINS.items()):
        n = len(prompts.load_classnames(b.classnames))
        t = len(prompts.load_templates(b.templates))
        lines.append(f"  {name:<14} {n:>4} classes, {t:>2} templates ({b.templates}); "
                     f"TFDS {b.tfds_name}")
    lines.append("other sources: " + ", ".join(
        f"{s}:{'NAME' if s == 'tfds' else 'PATH'}" for s in tasks.SOURCES))
    lines.append("template sets: " + ", ".join(prompts.builtin_templates()))
    from clipjax.evaluate import suites

    lines.append("suites (webdatasets under --data-dir): " + ", ".join(
        f"{k} ({len(v)} datasets)" for k, v in suites.SUITES.items()))
    return "\n".join(lines)


def run(args) -> int:
    from clipjax import config as config_lib
    from clipjax.errors import ClipjaxError
    from clipjax.evaluate import tasks

    if args.tasks in ("help", "list"):
        print(_list_tasks())
        return 0
    from clipjax.evaluate.xla_flags import tune_cpu_flags

    tune_cpu_flags()  # before JAX starts its CPU backend
    config_file = next((a.split("=", 1)[1] for a in args.config_args
                        if a.startswith("--config=")), None)
    overrides = [a for a in args.config_args if not a.startswith("--config=")]
    config = config_lib.load(config_file, overrides)
    task_text = args.tasks if args.tasks is not None else config.eval.tasks
    if not task_text:
        raise ClipjaxError("give --tasks NAME[,NAME...] or --config with eval.tasks; known "
                           f"tasks: {', '.join(tasks.known_tasks())}")
    from clipjax.evaluate import suites

    task_text, plans = suites.expand(task_text, args.data_dir or config.eval.data_dir)
    task_list = tasks.parse_list(task_text)

    from clipjax.evaluate import evaluator

    opts = evaluator.options_from_config(
        config, task_list, checkpoint=args.checkpoint, watch=args.watch,
        watch_timeout=args.watch_timeout, poll_interval=args.poll_interval,
        data_dir=args.data_dir, classnames=args.classnames, templates=args.templates,
        batch_size=args.batch_size, max_examples=args.max_examples,
        confusion_matrix=args.confusion_matrix, force=args.force or None,
        positives=args.positives, params=args.params,
        progress=flags.progress(args))
    if opts.batch_size <= 0:
        raise ClipjaxError(f"--batch-size must be positive; got {opts.batch_size}")
    ev = evaluator.Evaluator(args.workdir, opts)
    out = ev.run()
    if plans:  # --tasks datacomp / clip_benchmark: the suite's table and average
        suites.report(ev.workdir, plans, out, opts.checkpoint)
    return 0
