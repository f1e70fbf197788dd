"""`clipjax demo`: pretrain a small CLIP on Fashion-MNIST here, then evaluate it zero-shot.

The README's first command. Each phase is the CLI a user would type
(`clipjax data convert`, `clipjax train`, `clipjax eval`), run in this process
and timed; the zero-shot evaluation uses prompt templates that no training
caption used, so the score measures transfer, not memorised strings.

`--workdir` may be relative, absolute or a URI (`gs://bucket/demo`): everything the
demo writes (the downloaded IDX files, shards, run, results) goes there through
`clipjax.paths`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import posixpath
import shutil
import subprocess
import time
import urllib.request

HELP = "the embedded demo: pretrain on Fashion-MNIST captions, zero-shot eval on held-out prompts"

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
# Where TFDS's fashion_mnist builder downloads the same four files from.
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

# A varied caption set: with `loss.positives=label` (configs/demo.py) every same-class pair
# is a positive, so more templates make the text tower robust to wording instead of turning
# same-class pairs into false negatives (as `positives=caption` did: 8 templates stayed
# near chance for 175 steps there). Each image gets one of these at conversion.
TRAIN_TEMPLATES = (
    "a photo of a {}.", "a photo of the {}.", "a close-up photo of a {}.",
    "a bright photo of a {}.", "a cropped photo of the {}.", "a good photo of a {}.",
    "a photo of my {}.", "a dark photo of the {}.", "a blurry photo of a {}.", "itap of a {}.",
)
# Held out: no training caption was made from these.
EVAL_TEMPLATES = (
    "a picture of a {}.", "an image of the {}.", "a low resolution photo of a {}.",
    "a black and white photo of the {}.", "a centered photo of a {}.",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="runs/demo", help="where everything goes")
    parser.add_argument("--data-dir", default="",
                        help=f"Fashion-MNIST IDX files (default: {DEBIAN_DIR}, installed with "
                             "apt-get when missing and permitted, else downloaded)")
    parser.add_argument("--config", default="", help="training config (default configs/demo.py)")
    parser.add_argument("--steps", type=int, default=0, help="override train.steps")


def run(args) -> int:
    from clipjax import cli, paths
    from clipjax.errors import ClipjaxError

    workdir = paths.to_str(args.workdir)
    paths.makedirs(workdir)
    timings: dict[str, float] = {}

    def phase(name, argv):
        print(f"\n== {name}: clipjax {' '.join(argv)}", flush=True)
        start = time.perf_counter()
        rc = cli.main(argv)
        timings[name] = time.perf_counter() - start
        if rc:
            raise ClipjaxError(f"the {name} phase failed (exit status {rc})")

    start = time.perf_counter()
    data_dir = find_fashion_mnist(args.data_dir, posixpath.join(workdir, "fashion-mnist"))
    timings["data"] = time.perf_counter() - start

    shards = posixpath.join(workdir, "shards", "train")
    if not paths.exists(posixpath.join(shards, "sizes.json")):
        phase("convert", convert_argv(data_dir, shards))

    config = args.config or _default_config()
    train = ["train", "--config", f"{config}:{shard_urls(shards)}", "--workdir", workdir]
    if args.steps:
        train.append(f"--config.train.steps={args.steps}")
    phase("train", train)

    phase("eval", eval_argv(workdir, data_dir, *write_eval_files(workdir)))

    result = latest_result(workdir)
    print("\n== demo summary")
    for name, seconds in timings.items():
        print(f"  {name:<8} {seconds:7.1f} s")
    print(f"  zero-shot top-1 on the {result['num_examples']} Fashion-MNIST test images "
          f"(held-out prompts): {100 * result['top1']:.2f}%  (top-5 {100 * result['top5']:.2f}%, "
          f"step {result['step']})")
    print(f"  results, plots and TensorBoard events: {workdir}/eval, {workdir}/tb")
    return 0


def _default_config() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.join(os.getcwd(), "configs", "demo.py"),
                  os.path.join(here, "..", "..", "configs", "demo.py")]
    for c in candidates:
        if os.path.isfile(c):
            return os.path.normpath(c)
    from clipjax.errors import ClipjaxError

    raise ClipjaxError("configs/demo.py not found; pass --config")


def find_fashion_mnist(data_dir: str, cache_dir: str) -> str:
    """The IDX files: given, Debian's package (installing it if allowed), or downloaded
    into `cache_dir` (local or a URI)."""
    from clipjax import paths
    from clipjax.errors import ClipjaxError

    for d in filter(None, (data_dir, DEBIAN_DIR, cache_dir)):
        if all(paths.exists(paths.join(d, f)) for f in FILES):
            return paths.to_str(d)
    if data_dir:
        raise ClipjaxError(f"{data_dir}: missing Fashion-MNIST IDX files ({', '.join(FILES)})")
    if shutil.which("apt-get") and os.geteuid() == 0:
        print("installing Debian's dataset-fashion-mnist package ...", flush=True)
        r = subprocess.run(["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"],
                           capture_output=True, text=True)
        if r.returncode == 0 and os.path.exists(os.path.join(DEBIAN_DIR, FILES[0])):
            return DEBIAN_DIR
    print(f"downloading Fashion-MNIST from {DOWNLOAD_URL} ...", flush=True)
    for name in FILES:
        target = paths.join(cache_dir, name)
        try:
            with urllib.request.urlopen(DOWNLOAD_URL + name, timeout=60) as r:
                data = r.read()
            gzip.decompress(data)  # a truncated or HTML answer fails here, not in training
        except Exception as e:
            raise ClipjaxError(
                f"cannot obtain Fashion-MNIST ({e}); install Debian's dataset-fashion-mnist "
                "or pass --data-dir") from e
        paths.write_bytes(target, data)
    return paths.to_str(cache_dir)


# The phases' command lines, shared with benchmarks/demo_recipes.py (which runs recipes
# the way the demo does).


def convert_argv(data_dir: str, shards: str) -> list[str]:
    """`clipjax data convert` of the training IDX files into the demo's shards."""
    argv = ["data", "convert", "--from", "idx", data_dir, "--split", "train", "--out", shards,
            "--shard-size", "10000", "--image-format", "png"]
    for t in TRAIN_TEMPLATES:
        argv += ["--template", t]
    return argv


def shard_urls(shards: str) -> str:
    """The brace pattern of every shard `convert_argv` wrote (from its sizes.json)."""
    from clipjax import paths

    num_shards = len(json.loads(paths.read_text(posixpath.join(shards, "sizes.json"))))
    return posixpath.join(shards, f"{{00000..{num_shards - 1:05d}}}.tar")


def write_eval_files(directory: str) -> tuple[str, str]:
    """The class names and the held-out templates, one per line: (classnames, templates)."""
    from clipjax import paths
    from clipjax.data.idx import FASHION_MNIST_CLASSES

    out = (posixpath.join(directory, "classnames.txt"),
           posixpath.join(directory, "heldout_templates.txt"))
    for path, lines in zip(out, (FASHION_MNIST_CLASSES, EVAL_TEMPLATES)):
        paths.write_text(path, "\n".join(lines) + "\n")
    return out


def eval_argv(workdir: str, data_dir: str, classnames: str, templates: str) -> list[str]:
    """`clipjax eval` of the latest checkpoint on the 10k test images, held-out prompts."""
    return ["eval", "--workdir", workdir, "--tasks", "fashion_mnist", "--data-dir", data_dir,
            "--classnames", classnames, "--templates", templates, "--confusion-matrix",
            "--force"]


def latest_result(workdir: str) -> dict:
    """The result JSON of the newest evaluated step."""
    from clipjax import paths

    directory = paths.join(workdir, "eval", "fashion_mnist")
    steps = sorted(int(n[:-5]) for n in paths.listdir(directory) if n[:-5].isdigit())
    return json.loads(paths.read_text(paths.join(directory, f"{steps[-1]}.json")))
