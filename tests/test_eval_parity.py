"""Zero-shot parity with the reference: a tiny open_clip model trained here on Fashion-MNIST
captions scores the same top-1 under open_clip's own zero-shot code and under
`clipjax import open_clip` + `clipjax eval`, on the same test images with the same templates.

Uses the Debian package's Fashion-MNIST when installed (the full 10k test split);
otherwise a small real-image IDX set cut from scikit-image's bundled photos.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from eval_data import write_idx_split

from clipjax.evaluate import datasets, prompts

peer = pytest.importorskip("clipjax.interop.peer")
if not peer.available():  # pragma: no cover - the test extra installs the peer
    pytest.skip("open_clip is not installed", allow_module_level=True)

FASHION = "/usr/share/datasets/fashion-mnist"
IMAGE, PATCH, WIDTH, LAYERS = 28, 7, 64, 2
CONTEXT, TEXT_WIDTH, EMBED = 16, 64, 32
TRAIN_TEMPLATES = ("a picture of a {}.", "{}", "an image showing the {}.", "my {}.")
STEPS, BATCH = 150, 128

# scikit-image photos as ten "classes" for machines without the Debian package.
SKIMAGE_CLASSES = (("camera", "cameraman"), ("coins", "coins"), ("moon", "moon"),
                   ("page", "page of text"), ("text", "road sign text"), ("clock", "clock"),
                   ("brick", "brick wall"), ("grass", "grass"), ("gravel", "gravel"),
                   ("horse", "horse"))


def _skimage_idx(directory: str) -> list[str]:
    """Random 28x28 crops of ten grayscale photos: a small real-image labelled set."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(0)
    photos = []
    for name, _ in SKIMAGE_CLASSES:
        img = np.asarray(getattr(data, name)())
        if img.ndim == 3:
            img = img[..., :3].mean(-1)
        if img.dtype == bool:
            img = img * 255
        photos.append(np.asarray(img, np.float32))
    for split, n in (("train", 3000), ("test", 1000)):
        labels = rng.integers(0, 10, n)
        images = np.empty((n, 28, 28), np.uint8)
        for i, c in enumerate(labels):
            p = photos[c]
            size = int(rng.integers(min(p.shape) // 4, min(p.shape) // 2))
            y, x = rng.integers(0, p.shape[0] - size), rng.integers(0, p.shape[1] - size)
            crop = Image.fromarray(p[y:y + size, x:x + size].astype(np.uint8))
            images[i] = np.asarray(crop.resize((28, 28), Image.Resampling.BILINEAR))
        write_idx_split(directory, split, images, labels.astype(np.uint8))
    return [label for _, label in SKIMAGE_CLASSES]


def _train_open_clip(open_clip, train_images, train_labels, classnames):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    vision = open_clip.CLIPVisionCfg(layers=LAYERS, width=WIDTH, head_width=32,
                                     patch_size=PATCH, image_size=IMAGE)
    text = open_clip.CLIPTextCfg(context_length=CONTEXT, width=TEXT_WIDTH, heads=2,
                                 layers=LAYERS)
    model = open_clip.CLIP(EMBED, vision, text, quick_gelu=True)
    preprocess = open_clip.image_transform(IMAGE, is_train=False)
    mean = torch.tensor(preprocess.transforms[-1].mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.transforms[-1].std).view(1, 3, 1, 1)
    # 28x28 grayscale at the model's size: the train-time transform is just normalisation.
    pixels = torch.from_numpy(train_images).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    prompts_tok = {(c, t): open_clip.tokenize(t.format(name), CONTEXT)[0]
                   for c, name in enumerate(classnames) for t in TRAIN_TEMPLATES}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(STEPS):
        idx = rng.integers(0, len(train_labels), BATCH)
        images = (pixels[idx] - mean) / std
        tpl = rng.integers(0, len(TRAIN_TEMPLATES), BATCH)
        tokens = torch.stack([prompts_tok[(int(train_labels[i]), TRAIN_TEMPLATES[t])]
                              for i, t in zip(idx, tpl)])
        img, txt, scale = model(images, tokens)
        logits = scale * img @ txt.T
        # Captions of one class are all positives of each other: soft targets.
        same = torch.from_numpy(train_labels[idx][:, None] == train_labels[idx][None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, preprocess


def _open_clip_top1(open_clip, model, preprocess, images, labels, classnames, templates):
    """open_clip's own zero-shot path: build_zero_shot_classifier + top-k accuracy."""
    import torch
    from PIL import Image

    tokenizer = lambda texts: open_clip.tokenize(texts, CONTEXT)
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(
            model, tokenizer=tokenizer, classnames=classnames, templates=templates,
            num_classes_per_batch=10, device="cpu")
        correct = 0
        for i in range(0, len(labels), 500):
            batch = torch.stack([preprocess(Image.fromarray(im)) for im in images[i:i + 500]])
            feats = model.encode_image(batch, normalize=True)
            logits = 100.0 * feats @ classifier
            pred = logits.topk(1, 1, True, True)[1].t()
            target = torch.from_numpy(labels[i:i + 500].astype(np.int64))
            correct += int(pred.eq(target.view(1, -1).expand_as(pred)).sum())
    return correct / len(labels)


def _import(main, ckpt, workdir) -> None:
    """`clipjax import open_clip` with the tiny model's open_clip model config."""
    model_config = {
        "embed_dim": EMBED, "quick_gelu": True,
        "vision_cfg": {"image_size": IMAGE, "layers": LAYERS, "width": WIDTH, "head_width": 32,
                       "patch_size": PATCH},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": TEXT_WIDTH,
                     "heads": 2, "layers": LAYERS},
    }
    assert main(["import", "open_clip", "--model-config", json.dumps(model_config),
                 "--checkpoint", str(ckpt), "--workdir", str(workdir)]) == 0


@pytest.mark.timeout(600)
def test_zero_shot_top1_matches_open_clip(tmp_path):
    import torch

    from clipjax.cli import main

    open_clip = peer.open_clip()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: more threads only contend (4x slower on 2 cores)
    try:
        _parity(open_clip, main, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _parity(open_clip, main, tmp_path):
    import torch

    if os.path.exists(os.path.join(FASHION, "t10k-images-idx3-ubyte.gz")):
        data_dir, task = FASHION, "fashion_mnist"
        classnames = prompts.load_classnames("fashion_mnist")
    else:
        data_dir, task = str(tmp_path / "idx"), "skimage"
        classnames = _skimage_idx(data_dir)
    names_file = tmp_path / "classnames.txt"
    names_file.write_text("\n".join(classnames) + "\n")
    train = datasets.idx_source(data_dir, "train")
    test = datasets.idx_source(data_dir, "test")
    train_images = np.stack([im for im, _ in train])[:20000]
    train_labels = np.array([y for _, y in train])[:20000]
    test_images = np.stack([im for im, _ in test])
    test_labels = np.array([y for _, y in test])
    templates = prompts.load_templates("fashion_mnist")  # held out: not the training captions

    model, preprocess = _train_open_clip(open_clip, train_images, train_labels, classnames)
    ref = _open_clip_top1(open_clip, model, preprocess, test_images, test_labels, classnames,
                          templates)
    assert ref > 0.3, f"the reference model did not learn (top-1 {ref:.3f}; chance 0.1)"

    ckpt = tmp_path / "open_clip.pt"
    torch.save(model.state_dict(), ckpt)
    workdir = tmp_path / "imported"
    _import(main, ckpt, workdir)

    if task == "fashion_mnist":  # the built-in task: its data dir, names and templates
        task_args = ["--tasks", "fashion_mnist"]
    else:
        task_args = ["--tasks", f"{task}=idx:{data_dir}", "--classnames", str(names_file),
                     "--templates", "fashion_mnist"]
    assert main(["eval", "--workdir", str(workdir), *task_args, "--no-progress"]) == 0
    rec = json.load(open(workdir / "eval" / task / "0.json"))
    assert rec["num_examples"] == len(test_labels)
    print(f"top-1 open_clip {ref:.4f} clipjax {rec['top1']:.4f} on {len(test_labels)} images")
    assert abs(rec["top1"] - ref) <= 0.001, (rec["top1"], ref)
