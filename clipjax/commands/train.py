"""`clipjax train --config configs/x.py[:arg] --workdir DIR [--config.k=v ...]`."""

from __future__ import annotations

import argparse
import logging
import os

HELP = "pretrain (or resume) a CLIP model from a config on any mesh; writes WORKDIR"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE.py[:ARG]",
        help="config file (get_config(arg) -> ConfigDict); override keys with --config.k=v")
    parser.add_argument(
        "--workdir", required=True,
        help="run directory: config.json, checkpoints/, metrics.jsonl, tb/; resumes from the "
             "latest checkpoint found there")
    parser.add_argument(
        "--progress", choices=("auto", "on", "off"), default="auto", nargs="?", const="on",
        help="progress bar (auto: when stderr is a terminal; a bare --progress means on)")


def run(args) -> int:
    import clipjax.losses  # noqa: F401  (registers the loss options' config checks)
    from clipjax import config as config_lib

    # Validate before any device is touched or anything compiles (bad keys exit 2 here).
    config = config_lib.load_args(args.config_args)

    from clipjax import runtime

    runtime.initialize_distributed(config.runtime)
    runtime.use_compilation_cache(config.runtime.compilation_cache)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from clipjax.train import loop

    progress = {"auto": None, "on": True, "off": False}[args.progress]
    return loop.train(config, os.fspath(args.workdir), progress=progress)

