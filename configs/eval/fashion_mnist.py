"""Zero-shot Fashion-MNIST (10k test images, IDX files of the Debian package) for a run.

    clipjax eval --workdir DIR --config configs/eval/fashion_mnist.py --watch

Templates of your own (e.g. held out from training captions): --templates FILE.
"""

from clipjax.config import default_config


def get_config(arg=None):
    c = default_config()
    c.eval.tasks = "fashion_mnist"
    c.eval.batch_size = 256
    c.eval.confusion_matrix = True
    c.eval.watch_timeout = 1800.0
    c.eval.poll_interval = 30.0
    return c
