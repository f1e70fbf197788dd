"""CLIP ViT-B/16 at OpenAI's recipe (see clip_vit_b32.py): batch 32,768, AdamW lr 5e-4,
wd 0.2, 2k warmup, cosine; params and optimizer state sharded over 4 devices (`fsdp`).

`--config.data.train.urls=...` gives the shards; the optional arg sets the batch.
"""

from clipjax.train.recipes import openai_clip


def get_config(arg=None):
    c = openai_clip("ViT-B-16-quickgelu", arg)
    c.mesh.data, c.mesh.fsdp = -1, 4
    return c
