"""Using a model: an incremental embedding cache, vector search, zero-shot
classification with your own labels, CLIPScore and contact sheets.

Every function takes a `clipjax.inference.ClipModel` (or only its embeddings),
so the same code serves the CLI (`clipjax embed|search|classify|calibrate|score`)
and the Python methods on `ClipModel`.
"""
