"""The reference side of tests/test_clip_benchmark_parity.py, run as its own process.

    python tests/clip_benchmark_peer.py OUT FASHION_MNIST_DIR N_CLS N_RET STEPS
    python tests/clip_benchmark_peer.py cli eval ...   # = the `clip_benchmark` console script

1. Lays Fashion-MNIST's test IDX files out as torchvision's `FashionMNIST` class
   expects (OUT/torchvision/FashionMNIST/raw/) and exports the first N_CLS test
   images with CLIP_benchmark's own exporter (`convert_dataset`) to OUT/wds/fmnist;
   a retrieval set of the next N_RET images with 5 template captions each
   (`convert_retrieval_dataset`) to OUT/wds/fmnist_captions.
2. Builds a tiny open_clip CLIP (random init, seed 0), trains it STEPS steps on
   Fashion-MNIST training images with class-name captions, and writes it as an
   open_clip `local-dir:` model: OUT/model/{open_clip_config.json,
   open_clip_model.safetensors}.
3. Runs CLIP_benchmark's CLI (`clip_benchmark eval`, the console script's main()) on
   both sets with that model: OUT/cb_fmnist.json, OUT/cb_fmnist_captions.json.

A separate process because the exporter forks DataLoader workers, which a process
that has started JAX must not do; one process for all three so torch loads once.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys

import numpy as np

IMAGE, PATCH, WIDTH, LAYERS = 28, 7, 64, 2
CONTEXT, TEXT_WIDTH, EMBED = 16, 64, 32
TEMPLATES = ("a photo of a {c}.", "a blurry photo of the {c}.", "a {c} on a plain background.")
CAPTIONS = ("a photo of a {c}, item {i}.", "item {i}: the {c}.", "a {c} numbered {i}.",
            "picture {i} shows a {c}.", "{c} number {i}")
TRAIN_TEMPLATES = ("a picture of a {}.", "{}", "an image showing the {}.", "my {}.")
BATCH = 128

MODEL_CFG = {
    "embed_dim": EMBED, "quick_gelu": True,
    "vision_cfg": {"image_size": IMAGE, "layers": LAYERS, "width": WIDTH, "head_width": 32,
                   "patch_size": PATCH},
    "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": TEXT_WIDTH,
                 "heads": 2, "layers": LAYERS},
}


def torchvision_layout(src: str, root: str) -> None:
    """root/FashionMNIST/raw/<name> uncompressed, as torchvision's MNIST classes read."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for name in os.listdir(src):
        if name.endswith(".gz"):
            with gzip.open(os.path.join(src, name)) as f, \
                    open(os.path.join(raw, name[:-3]), "wb") as g:
                shutil.copyfileobj(f, g)


def export(root: str, out: str, n_cls: int, n_ret: int) -> None:
    import torch.utils.data
    from clip_benchmark import webdataset_builder as wb
    from torchvision.datasets import FashionMNIST

    test = FashionMNIST(root, train=False, download=False, transform=wb.PIL_to_bytes("webp"))
    cls = torch.utils.data.Subset(test, range(n_cls))
    cls.classes = list(test.classes)
    cls.templates = list(TEMPLATES)
    wb.convert_dataset(cls, "test", os.path.join(out, "fmnist"), verbose=False)

    class Captioned(torch.utils.data.Dataset):
        def __len__(self):
            return n_ret

        def __getitem__(self, i):
            image, label = test[n_cls + i]
            c = test.classes[label].lower()
            return image, [t.format(c=c, i=i) for t in CAPTIONS]

    wb.convert_retrieval_dataset(Captioned(), "test", os.path.join(out, "fmnist_captions"),
                                 verbose=False)


def train(root: str, out: str, steps: int) -> None:
    import open_clip
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from torchvision.datasets import FashionMNIST

    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny ops: more threads only contend
    model = open_clip.CLIP(EMBED, open_clip.CLIPVisionCfg(**MODEL_CFG["vision_cfg"]),
                           open_clip.CLIPTextCfg(**MODEL_CFG["text_cfg"]), quick_gelu=True)
    train_set = FashionMNIST(root, train=True, download=False)
    images = train_set.data[:4096].float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    labels = train_set.targets[:4096].numpy()
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    tokens = {(c, t): open_clip.tokenize(t.format(name.lower()), CONTEXT)[0]
              for c, name in enumerate(train_set.classes) for t in TRAIN_TEMPLATES}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(steps):
        idx = rng.integers(0, len(labels), BATCH)
        tpl = rng.integers(0, len(TRAIN_TEMPLATES), BATCH)
        txt = torch.stack([tokens[(int(labels[i]), TRAIN_TEMPLATES[t])] for i, t in zip(idx, tpl)])
        img_f, txt_f, scale = model((images[idx] - mean) / std, txt)
        logits = scale * img_f @ txt_f.T
        same = torch.from_numpy(labels[idx][:, None] == labels[idx][None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    model_dir = os.path.join(out, "model")
    os.makedirs(model_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(model_dir, "open_clip_model.safetensors"))
    with open(os.path.join(model_dir, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": MODEL_CFG, "preprocess_cfg": {}}, f)
    print(f"trained {steps} steps, last loss {float(loss):.4f}", flush=True)


def _torchvision_ops() -> None:
    """torchvision 0.28 on the torch 2.13 CPU wheel imports only once its two ops are
    declared (clipjax.interop.peer's shim, see ../shared/DESIGN.md)."""
    from clipjax.interop import peer

    peer.open_clip()


def _numpy2_float() -> None:
    """clip-benchmark 1.6.2's `accuracy` calls float() on a 1-element numpy array, which
    NumPy >= 2.3 refuses; inside that one module, float() of a 1-element array is its
    element (the same value: a count of correct predictions). Its code runs unchanged."""
    import builtins

    from clip_benchmark.metrics import zeroshot_classification

    def _float(x=0.0):
        if getattr(x, "size", None) == 1 and hasattr(x, "item"):
            x = x.item()
        return builtins.float(x)

    zeroshot_classification.float = _float


def main(argv: list[str]) -> None:
    _torchvision_ops()
    if argv[0] == "cli":  # CLIP_benchmark's console script `clip_benchmark ARGS...`
        _numpy2_float()
        from clip_benchmark.cli import main as clip_benchmark_main

        sys.argv = ["clip_benchmark", *argv[1:]]
        clip_benchmark_main()
        return
    out, fashion, n_cls, n_ret, steps = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    root = os.path.join(out, "torchvision")
    torchvision_layout(fashion, root)
    export(root, os.path.join(out, "wds"), n_cls, n_ret)
    train(root, out, steps)
    _numpy2_float()
    from clip_benchmark.cli import main as clip_benchmark_main

    for dataset, task in (("fmnist", "zeroshot_classification"),
                          ("fmnist_captions", "zeroshot_retrieval")):
        sys.argv = ["clip_benchmark", *clip_benchmark_args(out, dataset, task)]
        clip_benchmark_main()


def clip_benchmark_args(out: str, dataset: str, task: str) -> list[str]:
    """`clip_benchmark eval` on OUT/wds/DATASET with the local-dir open_clip model; the
    metrics land in OUT/cb_DATASET.json."""
    model = os.path.join(out, "model")
    return ["eval", "--dataset", f"wds/{dataset}",
            "--dataset_root", os.path.join(out, "wds", dataset), "--task", task,
            "--model_type", "open_clip", "--model", f"local-dir:{model}",
            "--pretrained", os.path.join(model, "open_clip_model.safetensors"),
            "--recall_k", "1", "5", "10", "--batch_size", "250", "--num_workers", "0",
            "--no_amp", "--output", os.path.join(out, f"cb_{dataset}.json"), "--quiet"]


if __name__ == "__main__":
    main(sys.argv[1:])
