"""`clipjax compile --config configs/x.py --topology v5e-256 [--num-slices N] [--json]`."""

from __future__ import annotations

import argparse
import json

HELP = "compile the real train step for a Cloud TPU topology on this machine; report memory"
TAKES_CONFIG = True  # receives --config / --config.k=v (clipjax/cli.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.py[:ARG]",
                        help="config file; override keys with --config.k=v")
    parser.add_argument("--topology", required=True,
                        help="Cloud TPU slice: v5e-256, v5p-128, v4-64, v6e-64, ... or an "
                             "explicit shape such as v5p:4x4x12")
    parser.add_argument("--num-slices", type=int, default=1,
                        help="multi-slice: N slices joined by the data-center network (sets "
                             "mesh.slices; the report lists the collectives that cross them)")
    parser.add_argument("--save", metavar="FILE", help="serialize the compiled executable")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    import os

    from clipjax import config as config_lib

    config = config_lib.load_args(args.config_args)  # rejected before anything compiles
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from clipjax import aot

    report = aot.compile_for_topology(config, args.topology, args.num_slices, args.save)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(aot.format_report(report))
    return 0
