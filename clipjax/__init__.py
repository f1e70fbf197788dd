"""clipjax: CLIP-style image-text pretraining and zero-shot evaluation in JAX/Flax.

`clipjax.load(workdir)` gives a `ClipModel` for embedding, classification and
search; `clipjax <command>` is the CLI. Heavy modules load on first use.
"""

__version__ = "0.1.0"

from clipjax import runtime as _runtime  # noqa: E402  (light: os, sys, glob)

_runtime.pin_cpu_when_no_accelerator()

__all__ = ["ClipModel", "__version__", "load"]


def load(path, **kwargs):
    """Loads a trained or imported model from a workdir or a checkpoint directory
    (relative, absolute or a URI such as gs://bucket/run)."""
    from clipjax.inference import load as _load

    return _load(path, **kwargs)


def __getattr__(name):
    if name == "ClipModel":
        from clipjax.inference import ClipModel

        return ClipModel
    raise AttributeError(f"module 'clipjax' has no attribute {name!r}")
