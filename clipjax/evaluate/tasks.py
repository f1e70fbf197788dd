"""The task registry: what `--tasks NAME` means.

A task string is `[LABEL=]DATASET[@MODE][?split=SPLIT]`:

- DATASET is a built-in name (`clipjax eval --tasks help` lists them) or a
  source with a path: `idx:DIR`, `folder:DIR`, `wds:DIR` (CLIP_benchmark's
  wds layout), `tfds:NAME`, `captions:DIR` (images with .txt captions);
- MODE is `zeroshot` (default for labelled data), `linear_probe`, or
  `retrieval` (default for captioned data); without it, `wds:` and `tfds:` tasks
  take the mode from the data (class labels: zeroshot; captions only: retrieval);
- LABEL names the results folder (DIR/eval/LABEL/); by default the task string.

Built-in tasks read `--data-dir` when given: IDX files, a CLIP_benchmark wds
folder or class folders there are used as such; anything else is taken as a
TFDS data_dir. Fashion-MNIST defaults to the Debian package's IDX files.
Paths may be relative, absolute or URIs (`idx:gs://bucket/fashion-mnist`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from clipjax import paths
from clipjax.errors import ClipjaxError
from clipjax.evaluate import datasets
from clipjax.evaluate import prompts as prompts_lib

MODES = ("zeroshot", "linear_probe", "retrieval")
AUTO = "auto"  # no @MODE on a source whose data decides: resolved when the data is read
DATA_DECIDES = ("wds", "tfds")
SOURCES = ("idx", "folder", "wds", "tfds", "captions")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DEFAULT_TEMPLATES = "simple"


@dataclass(frozen=True)
class Builtin:
    """A named dataset with its label order, class names and templates."""

    tfds_name: str
    classnames: str  # a built-in class-name list
    templates: str  # a built-in template set
    test_split: str = "test"
    train_split: str = "train"
    idx_dir: str = ""  # default IDX folder, used when it exists


BUILTINS = {
    "fashion_mnist": Builtin("fashion_mnist", "fashion_mnist", "fashion_mnist",
                             idx_dir=FASHION_MNIST_DIR),
    "mnist": Builtin("mnist", "mnist", "mnist"),
    "cifar10": Builtin("cifar10", "cifar10", "cifar"),
    "cifar100": Builtin("cifar100", "cifar100", "cifar"),
    "imagenet1k": Builtin("imagenet2012", "imagenet1k", "imagenet1k", test_split="validation"),
    "stl10": Builtin("stl10", "stl10", "stl10"),
    "food101": Builtin("food101", "food101", "food101", test_split="validation"),
    "oxford_pets": Builtin("oxford_iiit_pet", "oxford_pets", "oxford_pets"),
    "flowers102": Builtin("oxford_flowers102", "flowers102", "flowers102"),
}


@dataclass(frozen=True)
class Task:
    label: str
    dataset: str  # built-in name or "source:arg"
    mode: str
    split: str = ""  # '' = the dataset's test split


def known_tasks() -> list[str]:
    return sorted(BUILTINS)


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@+-]+", "_", text).strip("_") or "task"


def parse(spec: str) -> Task:
    """Parses one task string; unknown names raise a ClipjaxError listing the known ones."""
    spec = spec.strip()
    label = ""
    if "=" in spec.split(":", 1)[0].split("?", 1)[0]:
        label, spec = spec.split("=", 1)
    split = ""
    if "?" in spec:
        spec, query = spec.rsplit("?", 1)
        for part in filter(None, query.split("&")):
            key, _, value = part.partition("=")
            if key != "split" or not value:
                raise ClipjaxError(f"task {spec!r}: unknown option {part!r} (only ?split=NAME)")
            split = value
    mode = ""
    if "@" in spec:
        spec, mode = spec.rsplit("@", 1)
        if mode not in MODES:
            raise ClipjaxError(f"task {spec!r}: unknown mode {mode!r}; choose from {MODES}")
    source, sep, arg = spec.partition(":")
    if sep:
        if source not in SOURCES:
            raise ClipjaxError(
                f"task {spec!r}: unknown source {source!r}; choose from {', '.join(SOURCES)}")
        if not arg:
            raise ClipjaxError(f"task {spec!r}: {source}: needs a path or name")
        default_label = f"{source}_{os.path.basename(os.path.normpath(arg))}"
    else:
        if spec not in BUILTINS:
            raise ClipjaxError(
                f"unknown task {spec!r}; known tasks: {', '.join(known_tasks())} "
                f"(or {', '.join(s + (':NAME' if s == 'tfds' else ':PATH') for s in SOURCES)})")
        default_label = spec
    if not mode:
        if sep and source == "captions":
            mode = "retrieval"
        else:
            mode = AUTO if sep and source in DATA_DECIDES else "zeroshot"
    if not label:
        label = default_label + ("" if mode in ("zeroshot", "retrieval", AUTO) else f"@{mode}")
    return Task(_sanitize(label), spec, mode, split)


def parse_list(text: str) -> list[Task]:
    specs = [s for s in (x.strip() for x in text.split(",")) if s]
    if not specs:
        raise ClipjaxError(f"no tasks given; known tasks: {', '.join(known_tasks())}")
    tasks = [parse(s) for s in specs]
    labels = [t.label for t in tasks]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ClipjaxError(f"tasks {dup} appear twice; give them LABEL= names")
    return tasks


# --------------------------------------------------------------------------- loading


def _has_idx(directory: str) -> bool:
    return any(f"t10k-images-idx3-ubyte{ext}" in paths.listdir(directory)
               for ext in ("", ".gz"))


def _has_wds(directory: str, split: str) -> bool:
    return any(f.endswith(".tar") for f in paths.listdir(paths.join(directory, split)))


def _folder_root(directory: str, split: str) -> str | None:
    """DIR/SPLIT/<class>/ or DIR/<class>/ with images, else None."""
    for root in (os.fspath(paths.join(directory, split)), paths.to_str(directory)):
        if paths.is_dir(root):
            subdirs = datasets.subdirs(root)
            if subdirs and any(datasets._images_in(os.fspath(paths.join(root, d)))
                               for d in subdirs):
                return root
    return None


def _from_directory(directory: str, split: str, name: str) -> datasets.Source | None:
    if _has_idx(directory):
        return datasets.idx_source(directory, split, name)
    if _has_wds(directory, split):
        return datasets.wds_source(directory, split, name)
    root = _folder_root(directory, split)
    if root is not None:
        return datasets.folder_source(root, name)
    return None


def load_source(task: Task, split: str, data_dir: str = "") -> datasets.Source:
    """The examples of one split of a task's dataset."""
    source, sep, arg = task.dataset.partition(":")
    if sep:
        if source == "tfds":
            return datasets.tfds_source(arg, split, data_dir, task.label)
        if source == "wds":  # a Hugging Face dataset name is downloaded to a cache first
            from clipjax.evaluate.clip_benchmark_wds import resolve

            arg = resolve(arg, split)
        if not paths.exists(arg):
            raise ClipjaxError(f"task {task.label}: {arg} does not exist")
        arg = paths.to_str(arg)
        if source == "idx":
            return datasets.idx_source(arg, split, task.label)
        if source == "wds":
            return datasets.wds_source(arg, split, task.label)
        if source == "captions":
            root = os.fspath(paths.join(arg, split))
            root = root if paths.is_dir(root) else arg
            return datasets.caption_folder_source(root, task.label)
        root = _folder_root(arg, split)
        if root is None:
            raise ClipjaxError(f"task {task.label}: {arg} has no class folders")
        return datasets.folder_source(root, task.label)
    builtin = BUILTINS[task.dataset]
    for directory in (data_dir, builtin.idx_dir):
        if directory and paths.is_dir(directory):
            found = _from_directory(directory, split, task.label)
            if found is not None:
                return found
    tfds_split = {"test": builtin.test_split, "train": builtin.train_split}.get(split, split)
    return datasets.tfds_source(builtin.tfds_name, tfds_split, data_dir, task.label)


def test_split(task: Task) -> str:
    return task.split or "test"


def classnames_for(task: Task, source: datasets.Source, override: str = "") -> list[str]:
    """--classnames FILE, else the built-in list, else the names the data carries."""
    if override:
        return prompts_lib.load_classnames(override)
    if task.dataset in BUILTINS:
        return prompts_lib.load_classnames(BUILTINS[task.dataset].classnames)
    if source.classnames:
        return list(source.classnames)
    raise ClipjaxError(f"task {task.label}: the data names no classes; pass --classnames FILE")


def templates_for(task: Task, source: datasets.Source, override: str = "") -> list[str]:
    """--templates FILE (or a built-in set name), else the task's, else the data's own."""
    if override:
        return prompts_lib.load_templates(override)
    if task.dataset in BUILTINS:
        return prompts_lib.load_templates(BUILTINS[task.dataset].templates)
    if source.templates:
        prompts_lib.check_templates(source.templates, f"task {task.label} templates")
        return list(source.templates)
    return prompts_lib.load_templates(DEFAULT_TEMPLATES)
