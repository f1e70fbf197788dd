"""open_clip's trainer defaults (open_clip_train with no flags but --model): AdamW lr 5e-4,
wd 0.2 on embeddings too, no gradient clipping, 10k warmup from lr/10k, cosine; batch 64.

For side-by-side runs against open_clip. The optional arg is the model preset
(default RN50, open_clip's default --model), e.g. `--config configs/open_clip_defaults.py:ViT-B-32`;
give the data with `--config.data.train.urls=...` and the length with `--config.train.steps=N`.
"""

from clipjax.train.recipes import open_clip_defaults


def get_config(arg=None):
    return open_clip_defaults(arg or "RN50")
