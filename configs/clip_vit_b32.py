"""CLIP ViT-B/32 at OpenAI's recipe (Radford et al. 2021): batch 32,768, AdamW
(β2 0.98, eps 1e-6), lr 5e-4, weight decay 0.2, 2k warmup steps, cosine decay,
32 epochs of 400M pairs; QuickGELU; bf16 compute with f32 params.

Give the data on the command line, e.g.
`--config.data.train.urls=gs://bucket/laion/{00000..41455}.tar`;
the optional arg sets the global batch (`configs/clip_vit_b32.py:4096`).
"""

from clipjax.train.recipes import openai_clip


def get_config(arg=None):
    return openai_clip("ViT-B-32-quickgelu", arg)
