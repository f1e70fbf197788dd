"""The benchmark model of `benchmarks/train_throughput.py`: a small CLIP that a CPU trains.

ViT: 64×64 images, patch 8, width 384, 6 layers, 6 heads, MLP 1536; text:
context 32, vocab 49,408, width 256, 4 heads, 6 layers; embed 256; global
batch 128; AdamW; float32; `synthetic` data unless overridden.
"""

from clipjax.config import default_config


def get_config(arg=None):
    c = default_config()
    c.model.embed_dim = 256
    c.model.dtype = "float32"
    c.model.image.image_size = 64
    c.model.image.patch_size = 8
    c.model.image.width = 384
    c.model.image.layers = 6
    c.model.image.heads = 6
    c.model.image.mlp_ratio = 4.0
    c.model.text.context_length = 32
    c.model.text.vocab_size = 49408
    c.model.text.width = 256
    c.model.text.heads = 4
    c.model.text.layers = 6
    c.data.batch_size = 128
    c.data.train.source = "synthetic"
    c.optim.name = "adamw"
    c.optim.warmup_steps = 100
    c.train.steps = 1000
    c.train.log_every = 10
    c.train.ckpt_every = 500
    return c
