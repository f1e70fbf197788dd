"""CLIP RN50 (ModifiedResNet) at OpenAI's recipe: batch 32,768, AdamW (β2 0.98,
eps 1e-8 for the ResNets), lr 5e-4, wd 0.2, 2k warmup, cosine.

`--config.data.train.urls=...` gives the shards; the optional arg sets the batch.
"""

from clipjax.train.recipes import openai_clip


def get_config(arg=None):
    c = openai_clip("RN50-quickgelu", arg)
    c.optim.eps = 1e-8
    return c
