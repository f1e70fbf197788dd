"""SigLIP ViT-B/16 (Zhai et al. 2023): sigmoid loss through the ring implementation
(memory flat in the batch), learnable logit bias (init -10) and scale (init log 10),
batch 32,768, AdamW (β2 0.95) lr 1e-3, wd 1e-4, cosine after 5k warmup steps, 9B
examples seen.

The text tower and tokenizer stay CLIP's (BPE, 77 tokens); `--config.data.train.urls=...`
gives the shards; the optional arg sets the batch.
"""

import math

from clipjax.train.recipes import openai_clip


def get_config(arg=None):
    c = openai_clip("ViT-B-16", arg)  # GELU, as SigLIP
    c.model.use_logit_bias = True
    c.model.logit_bias_init = -10.0
    c.model.logit_scale_init = math.log(10.0)
    c.loss.kind = "sigmoid"
    c.loss.impl = "ring"
    c.optim.lr = 1e-3
    c.optim.b2 = 0.95
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = 5000
    c.optim.clip_norm = 1.0
    c.train.steps = 9_000_000_000 // c.data.batch_size
    c.mesh.data, c.mesh.fsdp = -1, 4
    return c
