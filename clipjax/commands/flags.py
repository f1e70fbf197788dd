"""The flags several commands share, spelled one way everywhere: `--workdir` names the
model or run (`--model` is an alias), `--step` the checkpoint, `--progress
auto|on|off` the progress bar (`--no-progress` is an alias of `off`)."""

from __future__ import annotations

import argparse
import sys

WORKDIR_HELP = ("a clipjax workdir (trained or `clipjax import`ed; relative, absolute or "
                "gs://) or WORKDIR/checkpoints/STEP")


def add_workdir(p: argparse.ArgumentParser, *, required: bool = True, dest: str = "workdir",
                help: str = WORKDIR_HELP) -> None:
    p.add_argument("--workdir", "--model", dest=dest, required=required, metavar="DIR",
                   default=None, help=help + " (--model is an alias)")


def add_step(p: argparse.ArgumentParser, *, dest: str = "step", choices: str = "",
             help: str = "checkpoint step to load (default: the latest)") -> None:
    """`--step N`; with `choices` (e.g. "latest|all") the value is a string."""
    if choices:
        p.add_argument("--step", "--checkpoint", dest=dest, default=None,
                       metavar=f"STEP|{choices}", help=help + " (--checkpoint is an alias)")
    else:
        p.add_argument("--step", dest=dest, type=int, default=None, help=help)


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", nargs="?", const="on", default="auto",
                   choices=("auto", "on", "off"),
                   help="progress bar (auto, the default: when stderr is a terminal; a bare "
                        "--progress means on)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const="off",
                   help="no progress bar (the same as --progress off)")


def progress(args: argparse.Namespace) -> bool:
    """The progress setting as a bool, `auto` resolved against stderr."""
    if args.progress == "auto":
        return sys.stderr.isatty()
    return args.progress == "on"
