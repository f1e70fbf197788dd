"""CLIP ViT-L/14 at OpenAI's recipe (see clip_vit_b32.py) around ViT-L-14-quickgelu: batch
32,768, AdamW lr 5e-4, wd 0.2, 2k warmup, cosine; bf16 compute, scanned layers,
`dots_no_batch` remat; params and optimizer state sharded over 4 devices (`fsdp`).

The optional arg sets the global batch (`configs/clip_vit_l14.py:1048576`). ViT-L/14
activations overflow a 16 GiB v5e chip well before the loss does, so the recipe
accumulates gradients the GradCache way: micro-batches of 16,384 at 32k (2 of them), of
8,192 past it (32 images per chip on a v5e-256: 262k -> 32, 1M -> 128 micro-batches),
with the ring loss past 32k, whose memory is flat in the batch. On TPU and GPU
`model.kernels=auto` compiles the XLA kernels (autodiff projections,
`jax.nn.dot_product_attention`).

Measured with `clipjax compile --topology v5e-256 --config.loss.impl=ring`: at 1M it
needs 10.8 GiB per chip of 16 (64 micro-batches of 16,384 take 15.7: too close to the
edge). `--config.model.remat=full --config.train.grad_accum=64` fits in 8.0 GiB, at the
cost of recomputing every block's forward in the backward pass.

`--config.data.train.urls=...` gives the shards.
"""

from clipjax.train.recipes import openai_clip

OPENAI_BATCH = 32_768


def get_config(arg=None):
    c = openai_clip("ViT-L-14-quickgelu", arg)
    c.mesh.data, c.mesh.fsdp = -1, 4
    batch = c.data.batch_size
    micro = 16_384 if batch <= OPENAI_BATCH else 8_192
    # The fewest micro-batches of at most `micro` that split the batch evenly.
    c.train.grad_accum = next(k for k in range(1, batch + 1)
                              if batch % k == 0 and batch // k <= micro)
    if batch > OPENAI_BATCH:
        c.loss.impl = "ring"
    return c
