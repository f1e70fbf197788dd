"""`clipjax import`: OpenAI / open_clip weights -> a clipjax workdir (orbax params + config)."""

from __future__ import annotations

import argparse

HELP = "import OpenAI or open_clip weights (.safetensors / PyTorch) into a clipjax workdir"
TAKES_CONFIG = True  # receives --config / --config.k=v (clipjax/cli.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)
    oc = sub.add_parser(
        "open_clip", help="an open_clip checkpoint; the architecture from --model-config",
        description="Import an open_clip checkpoint (.safetensors, or a PyTorch file read with "
                    "torch.load(weights_only=True)).")
    oc.add_argument("--model-config", required=True, metavar="NAME_OR_JSON",
                    help="a preset name (e.g. ViT-B-32, RN50), an open_clip model-config .json "
                         "file, or inline JSON")
    oa = sub.add_parser(
        "openai", help="an OpenAI CLIP state_dict; the architecture inferred from its tensors",
        description="Import an OpenAI CLIP state_dict (.safetensors or PyTorch file). "
                    "TorchScript archives must be converted first (the error says how).")
    for p in (oc, oa):
        p.add_argument("--checkpoint", required=True, metavar="FILE",
                       help=".safetensors or PyTorch (.pt/.bin) file holding the state_dict "
                            "(local or gs://)")
        p.add_argument("--workdir", required=True, metavar="OUT",
                       help="the clipjax workdir to create (must hold no checkpoint yet; "
                            "relative, absolute or gs://)")
        p.add_argument("--act", choices=("quick_gelu", "gelu"), default=None,
                       help="override the activation (open_clip weights of OpenAI models need "
                            "quick_gelu; use the -quickgelu preset or this flag)")
        p.add_argument("--image-size", type=int, default=0, metavar="PX",
                       help="import into this image size: the ViT's position embeddings are "
                            "resized bicubically (class token kept), as open_clip's "
                            "resize_pos_embed")
        p.add_argument("--context-length", type=int, default=0, metavar="N",
                       help="import into this text context length (positions resized "
                            "linearly, as open_clip's resize_text_pos_embed)")
        p.add_argument("--scan-layers", action="store_true",
                       help="store the transformer blocks stacked for model.scan_layers=True")


def run(args) -> int:
    from clipjax import checkpoint, paths
    from clipjax.errors import ClipjaxError

    if args.config_args:
        raise ClipjaxError("import takes no --config arguments; the architecture comes from "
                           "the checkpoint (openai) or --model-config (open_clip)")
    workdir = paths.to_str(args.workdir)  # relative: where the command was started
    if checkpoint.finalized_steps(workdir):
        raise ClipjaxError(f"{args.workdir} already holds a checkpoint; choose a new --workdir")
    for flag, value in (("--image-size", args.image_size),
                        ("--context-length", args.context_length)):
        if value < 0:
            raise ClipjaxError(f"{flag} must be positive; got {value}")
    resized: list[str] = []
    kw = dict(act=args.act, image_size=args.image_size, context_length=args.context_length,
              resized=resized)
    if args.source == "openai":
        from clipjax.interop.openai import import_openai

        params, config = import_openai(args.checkpoint, **kw)
    else:
        from clipjax.interop.open_clip import import_open_clip

        params, config = import_open_clip(args.checkpoint, args.model_config, **kw)
    for line in resized:
        print(f"resized {line}")
    if args.scan_layers:
        from clipjax.models import stack_layers

        config.model.scan_layers = True
        params = stack_layers(params)
    n = sum(int(x.size) for x in _leaves(params))
    path = checkpoint.save_params(workdir, params, config, metadata={
        "source": args.source, "checkpoint": paths.to_str(args.checkpoint)})
    img = config.model.image
    arch = (f"ViT width {img.width} x {img.layers}, patch {img.patch_size}"
            if img.kind == "vit" else f"ModifiedResNet {tuple(img.resnet_layers)} "
                                      f"width {img.resnet_width}")
    print(f"imported {args.source} {arch}, image {img.image_size}px, embed "
          f"{config.model.embed_dim}, {config.model.act}: {n:,} params -> {path}")
    return 0


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)
