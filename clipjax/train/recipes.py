"""Published training recipes as config builders, shared by the files in `configs/`.

Config files import these from the package (not from each other), so a config
loads from any working directory.
"""

from __future__ import annotations

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
