"""`clipjax export open_clip`: write a workdir's model as open_clip weights + model config."""

from __future__ import annotations

import argparse

from clipjax.commands import flags

HELP = "export a model for open_clip (safetensors + model config)"

FORMATS = ("open_clip",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("format", choices=FORMATS, help="the target library")
    flags.add_workdir(p)
    flags.add_step(p)
    p.add_argument("--params", choices=("raw", "ema"), default="raw",
                   help="the trained params (raw) or their moving average (ema: a run with "
                        "train.ema_decay > 0)")
    p.add_argument("--out", required=True, metavar="FILE.safetensors|DIR",
                   help="the weights file; a directory (no .safetensors suffix) gets open_clip's "
                        "local-dir layout (weights + open_clip_config.json with preprocessing); "
                        "local or gs://")
    p.add_argument("--model-config-out", metavar="NAME.json",
                   help="also write the open_clip model config; open_clip.add_model_config("
                        "NAME.json) registers it as NAME")
    p.epilog = ("Load in PyTorch: open_clip.add_model_config('NAME.json'); "
                "open_clip.create_model('NAME', pretrained='FILE.safetensors'), or "
                "open_clip.create_model_and_transforms('local-dir:DIR').")


def run(args) -> int:
    import posixpath
    import sys

    from clipjax import paths
    from clipjax.interop.export import export_open_clip

    result = export_open_clip(args.workdir, args.out, step=args.step,
                              model_config_out=args.model_config_out, params=args.params)
    print(f"wrote {result.weights} ({result.tensors} tensors)")
    if result.model_config:
        print(f"wrote {result.model_config}")
    out = paths.to_str(args.out)
    if not out.endswith(".safetensors"):
        print(f"load: open_clip.create_model_and_transforms('local-dir:{out}')")
    elif args.model_config_out:
        name = posixpath.splitext(posixpath.basename(result.model_config))[0]
        print(f"load: open_clip.add_model_config({result.model_config!r}); "
              f"open_clip.create_model({name!r}, pretrained={out!r})")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0
