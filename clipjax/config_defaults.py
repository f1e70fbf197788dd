"""The default config: every key clipjax reads, with its default (`configs/*.py`
start from `default_config()` and change values)."""

from __future__ import annotations

import math

from ml_collections import ConfigDict

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Flax logical-axis rules: one rule set serves data parallel, FSDP and tensor
# parallel; the mesh axis sizes (config.mesh) decide which of them is active.
DEFAULT_SHARDING_RULES = (
    ("batch", ("slices", "data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("length", None),
    ("patch", None),
    ("conv_in", None),
    ("conv_out", "model"),
    ("layers", None),
)


def default_config() -> ConfigDict:
    """Every key clipjax knows, with its default; the schema validation checks against."""
    c = ConfigDict()

    c.model = ConfigDict()
    c.model.embed_dim = 512
    c.model.act = "quick_gelu"  # quick_gelu | gelu
    c.model.dtype = "float32"  # compute dtype of both towers unless a tower overrides it
    c.model.param_dtype = "float32"
    c.model.scan_layers = False
    c.model.remat = "none"  # none | full | dots | dots_no_batch | save_nothing
    # auto: CPU-tuned projections + head-major attention when compiled for CPU, else
    # autodiff projections + jax.nn.dot_product_attention (cuDNN on GPU); cpu | xla force one
    c.model.kernels = "auto"
    c.model.logit_scale_init = math.log(1 / 0.07)
    c.model.use_logit_bias = False  # SigLIP adds a learnable bias
    c.model.logit_bias_init = -10.0

    c.model.image = ConfigDict()
    c.model.image.kind = "vit"  # vit | resnet
    c.model.image.image_size = 224
    c.model.image.dtype = ""  # '' = model.dtype
    # ViT
    c.model.image.patch_size = 32
    c.model.image.width = 768
    c.model.image.layers = 12
    c.model.image.heads = 12
    c.model.image.mlp_ratio = 4.0
    # What the image embedding pools (open_clip's vision_cfg.pool_type): tok = the class
    # token (OpenAI), avg = the mean of the patch tokens after ln_post (the class token
    # still attends; every token goes through the last block).
    c.model.image.pool = "tok"
    # ModifiedResNet
    c.model.image.resnet_layers = (3, 4, 6, 3)
    c.model.image.resnet_width = 64
    c.model.image.resnet_heads = 32
    # Inference preprocessing (the model's recipe).
    c.model.image.mean = OPENAI_MEAN
    c.model.image.std = OPENAI_STD
    c.model.image.interpolation = "bicubic"
    # FLIP: fraction of patch tokens dropped per training image (class token kept; none at
    # evaluation/inference). The kept count round((1 - p) * patches) is static.
    c.model.image.patch_dropout = 0.0

    c.model.text = ConfigDict()
    c.model.text.context_length = 77
    c.model.text.vocab_size = 49408
    c.model.text.width = 512
    c.model.text.heads = 8
    c.model.text.layers = 12
    c.model.text.mlp_ratio = 4.0
    c.model.text.pool = "argmax"  # argmax (EOT = highest id, OpenAI) | last | first
    c.model.text.dtype = ""

    c.model.tokenizer = ConfigDict()
    c.model.tokenizer.kind = "clip_bpe"  # clip_bpe | sentencepiece
    c.model.tokenizer.path = ""  # vocab (.txt.gz) or .model file; '' = the default

    c.data = ConfigDict()
    c.data.batch_size = 256  # global batch, split evenly over processes
    c.data.workers = 2
    c.data.prefetch = 2
    c.data.max_image_pixels = 89_478_485  # larger headers are skipped as decompression bombs
    c.data.threads = 2  # decode threads per worker process (PIL releases the GIL)
    c.data.index_cache = ""  # tar member indexes, shared by every process and host (local or gs://)
    c.data.train = ConfigDict()
    c.data.train.source = "synthetic"  # synthetic | webdataset | tfds | folder | mixture
    c.data.train.urls = ""  # brace pattern or '::'-separated list of tar shards
    c.data.train.name = ""  # tfds dataset name
    c.data.train.split = "train"
    c.data.train.data_dir = ""
    c.data.train.path = ""  # folder source
    c.data.train.caption_key = "caption"
    c.data.train.label_key = "label"
    c.data.train.mixture = ()  # ((source_config_json, weight), ...)
    c.data.train.image_key = "image"  # tfds image feature
    c.data.train.caption_choice = "random"  # random | first: among several captions
    c.data.train.caption_lines = False  # each line of a .txt is one caption
    c.data.train.templates = ()  # class-label captions; () = clipjax.data.captions defaults
    c.data.train.shuffle_window = 16  # shards shuffled together per epoch (0 = all)
    c.data.augment = ConfigDict()
    c.data.augment.crop_scale = (0.9, 1.0)
    c.data.augment.crop_ratio = (3 / 4, 4 / 3)
    c.data.augment.flip = False

    c.loss = ConfigDict()
    c.loss.kind = "softmax"  # softmax | sigmoid
    c.loss.impl = "dense"  # dense | ring
    c.loss.positives = "index"  # index | caption | label (same class id)
    c.loss.chunk = 0  # tile the local block further (0 = off)
    c.loss.logit_scale_max = math.log(100.0)

    c.optim = ConfigDict()
    c.optim.name = "adamw"  # adamw | adafactor | lion | sgd
    c.optim.lr = 5e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.2
    c.optim.schedule = "cosine"  # cosine | linear | constant
    c.optim.warmup_steps = 2000
    # zero: the first update uses lr 0 (lr·s/W); one_step: lr·(s+1)/W, open_clip's trainer
    c.optim.warmup_init = "zero"
    c.optim.end_lr = 0.0
    c.optim.clip_norm = 1.0  # 0 = off
    c.optim.frozen = ""  # regex over param paths, e.g. 'image/.*' (LiT)
    # no weight decay on 1-d params nor on paths matching this (biases, norms, embeddings, logit_*)
    c.optim.no_decay = r"(bias|scale|embedding)[^/]*$"

    c.train = ConfigDict()
    c.train.steps = 1000
    c.train.log_every = 10
    c.train.ckpt_every = 500
    c.train.keep = 3
    c.train.keep_every = 0  # 0 = keep only the last `keep`
    c.train.seed = 0
    c.train.grad_accum = 1
    c.train.nonfinite = "skip"  # skip | stop
    c.train.peak_flops = 0.0  # per device; 0 = measure a matmul at start-up
    c.train.init_from = ""  # workdir or checkpoint to take initial params from
    c.train.eval_every = 0  # >0: run eval.tasks in the training process every N steps
    c.train.ema_decay = 0.0  # EMA of the params kept in the train state; 0 = off
    c.train.init_from_keys = ".*"  # regex: which param paths init_from supplies (LiT: 'image/.*')

    c.mesh = ConfigDict()
    c.mesh.data = -1  # -1 = the devices the other axes leave
    c.mesh.fsdp = 1
    c.mesh.model = 1
    # multi-slice: a leading `slices` axis over the data-center network (batch over it,
    # params replicated across slices); clipjax compile --num-slices N sets it
    c.mesh.slices = 1
    c.sharding_rules = DEFAULT_SHARDING_RULES
    c.sharding = ConfigDict()
    # a param dimension its mesh axes do not divide: False = replicate it with a warning,
    # True = a ConfigError before anything compiles
    c.sharding.strict = False

    c.runtime = ConfigDict()
    c.runtime.distributed = "auto"  # auto | on | off
    c.runtime.coordinator_address = ""
    c.runtime.num_processes = 0
    c.runtime.process_id = -1
    # JAX's persistent compilation cache (local or gs://): a restarted or resumed run loads
    # its compiled step instead of compiling it again. '' = off (JAX_COMPILATION_CACHE_DIR
    # in the environment still applies)
    c.runtime.compilation_cache = ""

    c.eval = ConfigDict()
    c.eval.tasks = ""  # comma-separated built-in task names
    c.eval.batch_size = 256
    c.eval.data_dir = ""
    c.eval.checkpoint = "latest"  # STEP | latest | all: the existing checkpoints to evaluate
    c.eval.watch = False  # then also evaluate each new checkpoint as it appears
    c.eval.watch_timeout = 3600.0  # seconds without a new checkpoint before --watch stops
    c.eval.poll_interval = 10.0
    c.eval.classnames = ""  # file replacing every task's class names
    c.eval.templates = ""  # file (or built-in set name) replacing every task's templates
    c.eval.confusion_matrix = False
    c.eval.max_examples = 0  # per task and split; 0 = all
    c.eval.linear_probe_max_train = 10000
    # retrieval hits: index (the pair's own caption/image) | caption (also any identical
    # caption), reported as extra `_caption` metrics beside the standard ones
    c.eval.positives = "index"
    return c
