"""The embedded demo: a small CLIP pretrained from scratch on Fashion-MNIST captions on CPU.

`make demo` (clipjax demo) converts the 60k training images to webdataset shards
with captions from class names and templates, trains this config, and evaluates
zero-shot on the 10k test images with held-out templates. Ten classes share each
batch, so every pair of the same class counts as a positive (`loss.positives=label`,
labels from the shards' .json); that lets the captions vary over ten templates.
No random crop (flips only), lr 3e-3, weight decay 0.2, 1000 steps (4.3 epochs). The
image tower takes 7-pixel patches (16 tokens, width 128, 8 heads of 16, MLP ratio 2) and
embeds the class token; the text tower is one narrow layer (the captions are ten
templates over ten names) whose token table (49,408 x 64: 3.2M of the model's 3.8M
params, 31 rows of it in the training captions) stays at its random init
(`optim.frozen`): neither differentiated nor updated, it pays, with the thinner MLP,
for 1000 steps instead of 700. 88.55% zero-shot top-1 (seeds 1 and 2: 88.44%, 88.70%)
in 171-221 s of training (median 186 s) on a 2-core machine, where the recipe before
(700 steps, MLP ratio 4, mean-pooled, table trained) scored 87.68% (87.83% on another
machine) in 186-203 s, and the recipe of the issue's day 86.30% in 202-211 s (README,
"What `make demo` does").
"""

from clipjax.config import default_config

FASHION_MEAN = (0.286,) * 3
FASHION_STD = (0.353,) * 3


def get_config(arg=None):
    c = default_config()
    m = c.model
    m.embed_dim = 64
    m.act = "gelu"
    m.image.image_size = 28
    m.image.patch_size = 7
    m.image.width = 128
    m.image.mlp_ratio = 2.0
    m.image.layers = 4
    m.image.heads = 8
    m.image.pool = "tok"
    m.image.mean = FASHION_MEAN
    m.image.std = FASHION_STD
    m.text.context_length = 16
    m.text.width = 64
    m.text.heads = 2
    m.text.layers = 1

    c.data.train.source = "webdataset"
    c.data.train.urls = arg or "runs/demo/shards/train/{00000..00005}.tar"
    c.data.batch_size = 256
    c.data.workers = 0
    c.data.augment.crop_scale = (1.0, 1.0)  # no crop
    c.data.augment.flip = True

    c.loss.positives = "label"
    c.optim.lr = 3e-3
    c.optim.weight_decay = 0.2
    c.optim.warmup_steps = 50
    # The token table: the training captions look up 31 of its 49,408 rows, and it is 3.2M of
    # the 3.8M params AdamW would update each step (frozen: up to 17% less train time).
    c.optim.frozen = "text/token_embedding"
    c.train.steps = 1000
    c.train.log_every = 25
    c.train.ckpt_every = 250
    c.train.keep = 2
    return c
