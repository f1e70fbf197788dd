"""LiT (Zhai et al. 2022): a locked image tower from an imported checkpoint and a text
tower trained from scratch against it. Image params are frozen (no gradients, no
optimizer state); only `image/...` comes from the checkpoint.

    clipjax import open_clip ... --workdir runs/vitb16   # an OpenAI / open_clip ViT-B-16
    clipjax train --config configs/lit_vit_b16.py:runs/vitb16 --workdir runs/lit \\
        --config.data.train.urls=/data/{00000..00999}.tar

The arg is the imported workdir (same as `--config.train.init_from=DIR`).
"""

from clipjax.train.recipes import openai_clip


def get_config(arg=None):
    c = openai_clip("ViT-B-16", None)
    c.train.init_from = arg or ""
    c.train.init_from_keys = "image/.*"
    c.optim.frozen = "image/.*"
    c.optim.lr = 1e-3
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = 10_000
    c.optim.clip_norm = 1.0
    c.train.steps = 4_000_000_000 // c.data.batch_size  # LiT's 4B examples seen
    return c
