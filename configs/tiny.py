"""A tiny CLIP that trains in seconds on CPU: the config tests use.

Synthetic data by default; any source by override, e.g.
`--config.data.train.source=webdataset --config.data.train.urls=/data/{000000..000003}.tar`.
"""

from clipjax.config import default_config


def get_config(arg=None):
    c = default_config()
    c.model.embed_dim = 32
    c.model.image.image_size = 32
    c.model.image.patch_size = 8
    c.model.image.width = 64
    c.model.image.layers = 2
    c.model.image.heads = 2
    c.model.text.context_length = 16
    c.model.text.width = 64
    c.model.text.heads = 2
    c.model.text.layers = 2
    c.data.batch_size = 16
    c.data.workers = 0
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2
    c.train.steps = 10
    c.train.log_every = 1
    c.train.ckpt_every = 5
    if arg == "resnet":
        c.model.image.kind = "resnet"
        c.model.image.resnet_layers = (1, 1, 1, 1)
        c.model.image.resnet_width = 8
        c.model.image.resnet_heads = 4
    return c
