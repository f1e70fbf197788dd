"""CLIP ViT-L/14 at OpenAI's recipe (see clip_vit_b32.py) around ViT-L-14-quickgelu: batch
32,768, AdamW lr 5e-4, wd 0.2, 2k warmup, cosine; bf16 compute, scanned layers; params
and optimizer state sharded over 4 devices (`fsdp`).

The optional arg sets the global batch (`configs/clip_vit_l14.py:1048576`). ViT-L/14
activations overflow a 16 GiB v5e chip well before the loss does, so the recipe
accumulates gradients the GradCache way in micro-batches of at most 16,384 (64 images
per chip on a v5e-256: 32k -> 2, 262k -> 16, 1M -> 64 micro-batches) and, past 32k,
rematerialises each block entirely (`model.remat=full`) and takes the ring loss, whose
memory is flat in the batch. On TPU and GPU `model.kernels=auto` compiles the XLA
kernels (autodiff projections, `jax.nn.dot_product_attention`).

`--config.data.train.urls=...` gives the shards.
"""

from clipjax.train.recipes import openai_clip

MICRO_BATCH = 16_384


def get_config(arg=None):
    c = openai_clip("ViT-L-14-quickgelu", arg)
    c.mesh.data, c.mesh.fsdp = -1, 4
    batch = c.data.batch_size
    # The fewest micro-batches of at most MICRO_BATCH that split the batch evenly.
    c.train.grad_accum = next(k for k in range(1, batch + 1)
                              if batch % k == 0 and batch // k <= MICRO_BATCH)
    if batch > 32_768:
        c.model.remat = "full"
        c.loss.impl = "ring"
    return c
