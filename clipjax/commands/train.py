"""`clipjax train --config configs/x.py[:arg] --workdir DIR [--config.k=v ...]`."""

from __future__ import annotations

import argparse
import logging
import os

from clipjax.commands import flags

HELP = "pretrain (or resume) a CLIP model from a config on any mesh; writes WORKDIR"
TAKES_CONFIG = True  # receives --config / --config.k=v (clipjax/cli.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE.py[:ARG]",
        help="config file (get_config(arg) -> ConfigDict); override keys with --config.k=v")
    parser.add_argument(
        "--workdir", required=True,
        help="run directory: config.json, checkpoints/, metrics.jsonl, tb/; resumes from the "
             "latest checkpoint found there")
    flags.add_progress(parser)


def run(args) -> int:
    from clipjax import config as config_lib

    # Validate before any device is touched or anything compiles (bad keys exit 2 here).
    config = config_lib.load_args(args.config_args)

    from clipjax import runtime

    runtime.initialize_distributed(config.runtime)
    runtime.use_compilation_cache(config.runtime.compilation_cache)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from clipjax.train import loop

    progress = flags.progress(args)
    return loop.train(config, os.fspath(args.workdir), progress=progress)

