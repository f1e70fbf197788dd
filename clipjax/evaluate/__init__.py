"""Zero-shot evaluation: prompts, classification, retrieval, linear probe, and the
`clipjax eval` process that follows a workdir's checkpoints (see evaluator.py)."""
