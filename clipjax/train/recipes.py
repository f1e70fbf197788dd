"""Published training recipes as config builders, shared by the files in `configs/`.

Config files import these from the package (not from each other), so a config
loads from any working directory.
"""

from __future__ import annotations

import math

from ml_collections import ConfigDict

from clipjax.config import default_config

CLIP_SAMPLES_SEEN = 12_800_000_000  # OpenAI CLIP: 32 epochs × 400M pairs


def openai_clip(model_name: str, batch_size: int | None = None) -> ConfigDict:
    """OpenAI's CLIP recipe (Radford et al. 2021) around the preset `model_name`.

    Batch 32,768, AdamW (β2 0.98, eps 1e-6), lr 5e-4, weight decay 0.2,
    2k warmup steps then cosine, 12.8B samples seen; bf16 compute, f32 params,
    webdataset shards (give `data.train.urls`).
    """
    from clipjax.models.presets import model_config

    c = default_config()
    c.model = model_config(model_name)
    c.model.dtype = "bfloat16"
    c.model.scan_layers = c.model.image.kind == "vit"
    c.model.remat = "dots_no_batch"
    c.data.batch_size = int(batch_size) if batch_size else 32_768
    c.data.train.source = "webdataset"
    c.data.workers = 8
    c.data.augment.crop_scale = (0.9, 1.0)
    c.loss.kind = "softmax"
    c.loss.impl = "dense"
    c.optim.name = "adamw"
    c.optim.lr = 5e-4
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-6
    c.optim.weight_decay = 0.2
    c.optim.warmup_steps = 2000
    c.optim.schedule = "cosine"
    c.optim.clip_norm = 0.0  # OpenAI did not clip gradients
    c.train.steps = CLIP_SAMPLES_SEEN // c.data.batch_size
    c.train.log_every = 50
    c.train.ckpt_every = 2000
    c.train.keep = 3
    c.train.keep_every = 20_000
    c.mesh.data, c.mesh.fsdp, c.mesh.model = -1, 1, 1
    return c


# open_clip_train.params.parse_args([]) defaults (open-clip-torch 3.3.0) as clipjax keys.
OPEN_CLIP_BATCH_PER_GPU = 64
OPEN_CLIP_WARMUP = 10_000
# open_clip decays every ≥2-d param whose name holds none of bn/ln/bias/logit_scale: token
# and positional embeddings are decayed. clipjax's 2-d params of that kind are the
# (3, heads, head_dim) qkv biases (open_clip's in_proj_bias, 1-d); norms are 1-d here.
OPEN_CLIP_NO_DECAY = r"bias[^/]*$"


def open_clip_defaults(model_name: str = "RN50", gpus: int = 1) -> ConfigDict:
    """open_clip's trainer with no flags but `--model` (`open_clip_train.main`), as clipjax keys.

    AdamW with β/eps by model (ViT: β2 0.98, eps 1e-6; others 0.999, 1e-8, open_clip's
    `get_default_params`), lr 5e-4, weight decay 0.2 on every ≥2-d param but biases
    (embeddings included), no gradient clipping, 10k warmup steps from lr/10k (not 0),
    cosine to 0, batch 64 per GPU × `gpus`, f32 params. Only the optimizer and schedule are
    open_clip's: the data, steps and logging are yours to set.
    """
    from clipjax.models.presets import model_config

    c = default_config()
    c.model = model_config(model_name)
    vit = "vit" in model_name.lower()
    c.data.batch_size = OPEN_CLIP_BATCH_PER_GPU * int(gpus)
    c.data.augment.crop_scale = (0.9, 1.0)  # open_clip's RandomResizedCrop scale
    c.optim.name = "adamw"
    c.optim.lr = 5e-4
    c.optim.b1 = 0.9
    c.optim.b2, c.optim.eps = (0.98, 1e-6) if vit else (0.999, 1e-8)
    c.optim.weight_decay = 0.2
    c.optim.no_decay = OPEN_CLIP_NO_DECAY
    c.optim.clip_norm = 0.0  # --grad-clip-norm None
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = OPEN_CLIP_WARMUP
    c.optim.warmup_init = "one_step"
    c.optim.end_lr = 0.0
    c.train.grad_accum = 1  # --accum-freq 1
    c.train.seed = 0
    c.loss.kind = "softmax"
    c.loss.logit_scale_max = math.log(100.0)  # open_clip clamps logit_scale to ln 100
    return c
