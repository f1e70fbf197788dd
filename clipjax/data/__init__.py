"""Input side of clipjax: tokenizers, image preprocessing and the training data pipeline.

Submodules are imported on use (`clipjax.data.tokenizers`, `clipjax.data.preprocess`,
...), so importing the package costs nothing.
"""
