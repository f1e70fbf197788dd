"""Linear probes on frozen image embeddings (L2 strength chosen on a validation split):
Fashion-MNIST and CIFAR-10, next to their zero-shot scores.

    clipjax eval --workdir DIR --config configs/eval/linear_probe.py
"""

from clipjax.config import default_config


def get_config(arg=None):
    c = default_config()
    c.eval.tasks = "fashion_mnist,fashion_mnist@linear_probe,cifar10,cifar10@linear_probe"
    c.eval.linear_probe_max_train = 10000
    c.eval.batch_size = 256
    return c
