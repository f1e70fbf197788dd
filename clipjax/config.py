"""The default config, config-file loading with overrides, and validation.

Every recipe in `configs/` starts from `default_config()` and changes values;
`validate()` then rejects unknown keys, wrong types and inconsistent
combinations before anything is compiled, naming the key.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import ml_collections
from ml_collections import ConfigDict

from clipjax.errors import ConfigError

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


# --------------------------------------------------------------------------- validation

_CHOICES = {
    "model.act": ("quick_gelu", "gelu"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots", "dots_no_batch", "save_nothing"),
    "model.kernels": ("auto", "cpu", "xla"),
    "model.image.kind": ("vit", "resnet"),
    "model.image.dtype": ("", "float32", "bfloat16", "float16"),
    "model.image.interpolation": ("bicubic", "bilinear", "nearest"),
    "model.text.pool": ("argmax", "last", "first"),
    "model.text.dtype": ("", "float32", "bfloat16", "float16"),
    "model.tokenizer.kind": ("clip_bpe", "sentencepiece"),
    "data.train.source": ("synthetic", "webdataset", "tfds", "folder", "mixture"),
    "data.train.caption_choice": ("random", "first"),
    "loss.kind": ("softmax", "sigmoid"),
    "loss.impl": ("dense", "ring"),
    "loss.positives": ("index", "caption", "label"),
    "optim.name": ("adamw", "adafactor", "lion", "sgd"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "optim.warmup_init": ("zero", "one_step"),
    "train.nonfinite": ("skip", "stop"),
    "runtime.distributed": ("auto", "on", "off"),
    "eval.positives": ("index", "caption"),
}

_POSITIVE = (
    "model.embed_dim", "model.image.image_size", "model.image.patch_size", "model.image.width",
    "model.image.layers", "model.image.heads", "model.image.resnet_width",
    "model.image.resnet_heads", "model.text.context_length", "model.text.vocab_size",
    "model.text.width", "model.text.heads", "model.text.layers", "data.batch_size",
    "train.steps", "train.log_every", "train.ckpt_every", "train.keep", "train.grad_accum",
    "eval.batch_size",
    "eval.watch_timeout", "eval.poll_interval",
)
_NON_NEGATIVE = (
    "data.workers", "data.prefetch", "loss.chunk", "optim.lr", "optim.weight_decay",
    "optim.warmup_steps", "optim.clip_norm", "train.keep_every", "train.peak_flops",
    "train.eval_every",
    "eval.max_examples", "eval.linear_probe_max_train",
    "data.threads", "data.train.shuffle_window",
)

def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, ConfigDict | dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _type_ok(default, value) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, tuple | list):
        return isinstance(value, tuple | list)
    return isinstance(value, type(default))


def _get(config, dotted):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def unknown_key(key: str) -> ConfigError:
    """'unknown config key config.K (did you mean config.X?)', X the closest known key."""
    import difflib

    known = list(_flatten(default_config()))
    sections = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    guesses = difflib.get_close_matches(key, known + sorted(sections), n=1, cutoff=0.6)
    if not guesses:  # the right leaf in the wrong section: config.lr -> config.optim.lr
        leaf = key.rsplit(".", 1)[-1]
        guesses = [k for k in known if k.rsplit(".", 1)[-1] == leaf][:1] or [
            k for k in known if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]],
                                                          cutoff=0.8)][:1]
    hint = f" (did you mean config.{guesses[0]}?)" if guesses else ""
    err = ConfigError("", f"unknown config key config.{key}{hint}")
    err.key = key
    return err


def _check_known(keys: Sequence[str]) -> None:
    known = _flatten(default_config())
    for key in keys:
        if key not in known and not any(k.startswith(key + ".") for k in known):
            raise unknown_key(key)


def validate(config: ConfigDict) -> ConfigDict:
    """Checks keys, types and consistency; raises ConfigError naming the first bad key."""
    defaults = _flatten(default_config())
    values = _flatten(config)
    for key in values:
        if key not in defaults:
            raise unknown_key(key)
    for key, default in defaults.items():
        if key not in values:
            raise ConfigError(
                key, "missing (configs must start from clipjax.config.default_config())")
        value = values[key]
        if not _type_ok(default, value):
            raise ConfigError(
                key, f"expected {type(default).__name__}, got {type(value).__name__} {value!r}")
    for key, choices in _CHOICES.items():
        if values[key] not in choices:
            options = ", ".join(map(repr, choices))
            raise ConfigError(key, f"must be one of {options}; got {values[key]!r}")
    for key in _POSITIVE:
        if values[key] <= 0:
            raise ConfigError(key, f"must be positive; got {values[key]!r}")
    for key in _NON_NEGATIVE:
        if values[key] < 0:
            raise ConfigError(key, f"must be >= 0; got {values[key]!r}")
    _check_model(config.model)
    if not 0.0 <= float(config.train.ema_decay) < 1.0:
        raise ConfigError("train.ema_decay", f"must be in [0, 1); got {config.train.ema_decay!r}")
    _check_mesh(config)
    _check_loss(config)
    return config


def _check_loss(config: ConfigDict) -> None:
    """`loss.chunk` only tiles the ring, and must divide every device's micro-batch."""
    chunk = config.loss.chunk
    if chunk and config.loss.impl != "ring":
        raise ConfigError("loss.chunk", "tiles the ring loss only: set loss.impl='ring' or 0")
    micro = config.data.batch_size // max(config.train.grad_accum, 1)
    if chunk and micro % chunk:
        raise ConfigError(
            "loss.chunk", f"{chunk} does not divide the micro-batch {micro} "
            "(data.batch_size / train.grad_accum)")
    if not math.isfinite(config.loss.logit_scale_max):
        raise ConfigError("loss.logit_scale_max", "must be finite")


def _check_model(m: ConfigDict) -> None:
    img, txt = m.image, m.text
    if img.kind == "vit":
        if img.image_size % img.patch_size:
            raise ConfigError(
                "model.image.patch_size",
                f"image_size {img.image_size} is not divisible by patch_size {img.patch_size}")
        if img.width % img.heads:
            raise ConfigError(
                "model.image.heads", f"{img.heads} heads do not divide width {img.width}")
    else:
        if len(img.resnet_layers) != 4 or any(int(n) < 1 for n in img.resnet_layers):
            raise ConfigError("model.image.resnet_layers", "needs four positive block counts")
        if img.image_size % 32:
            raise ConfigError("model.image.image_size", "a ResNet needs a multiple of 32")
        if (img.resnet_width * 32) % img.resnet_heads:
            raise ConfigError(
                "model.image.resnet_heads",
                f"{img.resnet_heads} heads do not divide the pooled width {img.resnet_width * 32}")
    if txt.width % txt.heads:
        raise ConfigError("model.text.heads", f"{txt.heads} heads do not divide width {txt.width}")
    for key in ("mean", "std"):
        if len(img[key]) != 3:
            raise ConfigError(f"model.image.{key}", "needs 3 values (R, G, B)")
    if any(s <= 0 for s in img.std):
        raise ConfigError("model.image.std", "must be positive")
    pd = float(img.patch_dropout)
    if not 0.0 <= pd < 1.0:
        raise ConfigError("model.image.patch_dropout", f"must be in [0, 1); got {pd!r}")
    if pd and img.kind != "vit":
        raise ConfigError("model.image.patch_dropout", "drops ViT patch tokens; this is a ResNet")


def _check_mesh(c: ConfigDict) -> None:
    sizes = {k: c.mesh[k] for k in c.mesh}
    for k, v in sizes.items():
        if v == 0 or v < -1:
            raise ConfigError(f"mesh.{k}", f"must be a positive size or -1; got {v}")
    if sum(v == -1 for v in sizes.values()) > 1:
        raise ConfigError("mesh", "at most one axis may be -1")
    if sizes.get("slices", 1) < 1:
        raise ConfigError("mesh.slices", f"must be a positive slice count; got {sizes['slices']}")
    axes = set(sizes)
    for i, rule in enumerate(c.sharding_rules):
        if not (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ConfigError(
                f"sharding_rules[{i}]", f"expected (logical_name, mesh_axes); got {rule!r}")
        target = rule[1]
        targets = (target,) if isinstance(target, str) or target is None else tuple(target)
        for t in targets:
            if t is not None and t not in axes:
                raise ConfigError(
                    f"sharding_rules[{i}]", f"mesh axis {t!r} is not one of {sorted(axes)}")
    if sizes.get("slices", 1) > 1:
        batch = [t for name, t in c.sharding_rules if name == "batch"][:1]
        targets = batch[0] if batch else None
        targets = (targets,) if isinstance(targets, str) or targets is None else tuple(targets)
        if "slices" not in targets:
            raise ConfigError(
                "sharding_rules", f"mesh.slices={sizes['slices']} but the 'batch' rule does not "
                "split the batch over the 'slices' axis (every slice would repeat the work)")
    if c.data.batch_size % c.train.grad_accum:
        raise ConfigError(
            "train.grad_accum",
            f"{c.train.grad_accum} does not divide data.batch_size {c.data.batch_size}")


# --------------------------------------------------------------------------- loading


def load(config_arg: str | None, overrides: Sequence[str] = ()) -> ConfigDict:
    """Loads `path.py[:arg]` (or the default) and applies `--config.k=v` overrides, validated.

    Uses ml_collections' own flag parsing, so overrides follow the absl
    convention that big_vision and scenic use, with its type checks.
    """
    from absl import flags
    from ml_collections import config_flags

    argv = ["clipjax"]
    if config_arg:
        argv.append(f"--config={config_arg}")
    argv.extend(overrides)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", default=None, flag_values=fv, lock_config=True, sys_argv=argv)
    if not config_arg:
        if overrides:
            raise ConfigError("", "--config.KEY=VALUE overrides need --config FILE.py")
        return validate(default_config())
    path = config_arg.split(":", 1)[0]
    if not os.path.isfile(path):
        raise ConfigError("", f"config file {path!r} does not exist")
    # Every key a config may hold is a default_config() key: an override of any other is a
    # typo, named here (absl would print only the key's repr).
    _check_known([o.lstrip("-").split("=", 1)[0].removeprefix("config.") for o in overrides])
    try:
        fv(argv, known_only=False)
        config = fv.config
        config = ConfigDict(config.to_dict()) if config is not None else None
    except flags.Error as e:
        raise ConfigError(_key_from_flag_error(str(e), overrides), str(e).strip()) from None
    except (KeyError, AttributeError, TypeError, ValueError, OSError, SyntaxError) as e:
        key = _key_from_flag_error(str(e), overrides)
        if key and repr(key.rsplit(".", 1)[-1]) in str(e):
            raise unknown_key(key) from None
        raise ConfigError(key, f"{config_arg}: {str(e).strip()}") from None
    if config is None:
        raise ConfigError("", f"config file {config_arg!r} returned nothing")
    return validate(config)


def load_args(config_args: Sequence[str]) -> ConfigDict:
    """`load` for the CLI's `args.config_args` (`--config=FILE[:ARG]` and `--config.k=v`)."""
    files = [a.split("=", 1)[1] for a in config_args if a.startswith("--config=")]
    overrides = [a for a in config_args if a.startswith("--config.")]
    if len(files) > 1:
        raise ConfigError("", "--config given more than once")
    return load(files[0] if files else None, overrides)


def _key_from_flag_error(message: str, overrides: Sequence[str]) -> str:
    for o in overrides:
        key = o.lstrip("-").split("=", 1)[0].removeprefix("config.")
        if key and (key in message or repr(key.rsplit(".", 1)[-1]) in message):
            return key
    return ""


def from_json(text: str) -> ConfigDict:
    """Reads a config written by `to_json` (a workdir's config.json), validated."""
    data = json.loads(text)
    config = default_config()
    _merge(config, data, "")
    return validate(config)


def _merge(config: ConfigDict, data: dict, prefix: str) -> None:
    for k, v in data.items():
        key = prefix + k
        if k not in config:
            raise unknown_key(key)
        if isinstance(config[k], ConfigDict):
            _merge(config[k], v, key + ".")
        else:
            default = config[k]
            if isinstance(default, tuple):
                v = _to_tuple(v)
            elif isinstance(default, float) and isinstance(v, int):
                v = float(v)
            with config.ignore_type():
                config[k] = v


def _to_tuple(v):
    if isinstance(v, list):
        return tuple(_to_tuple(x) for x in v)
    return v


def to_json(config: ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def model_only(config: ConfigDict) -> ConfigDict:
    """A default config carrying `config.model`: what a workdir needs to rebuild the model."""
    out = default_config()
    out.model = ml_collections.ConfigDict(config.model.to_dict())
    return out


def kept_patches(patches: int, dropout: float) -> int:
    """How many of `patches` tokens an image keeps under `model.image.patch_dropout`
    (FLIP): static, so the program compiles once; at least one. Here, below the model
    and the input pipeline, because both need it."""
    return max(1, int(round((1.0 - float(dropout)) * patches))) if dropout else patches
