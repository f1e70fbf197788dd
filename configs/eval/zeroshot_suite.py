"""The CLIP paper's zero-shot classification suite that TFDS (or CLIP_benchmark wds
folders under --data-dir) can provide: ImageNet-1k (80 templates), CIFAR-10/100,
STL-10, Food-101, Oxford Pets, Flowers-102, MNIST, Fashion-MNIST.

    clipjax eval --workdir DIR --config configs/eval/zeroshot_suite.py --data-dir ~/tfds
    clipjax eval --workdir DIR --config configs/eval/zeroshot_suite.py:small   # no ImageNet
"""

from clipjax.config import default_config

SMALL = "cifar10,cifar100,stl10,mnist,fashion_mnist"
FULL = SMALL + ",food101,oxford_pets,flowers102,imagenet1k"


def get_config(arg=None):
    c = default_config()
    c.eval.tasks = SMALL if arg == "small" else FULL
    c.eval.batch_size = 256
    return c
