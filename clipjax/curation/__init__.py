"""Curating pretraining data: CLIP scores, score filtering and evaluation-set dedup.

`samples` reads shards with the training pipeline's bad-sample rules, `tables`
stores per-shard results as Parquet, `score` embeds pairs on any number of
processes, `rules` and `filter` decide what to keep and write new shards,
`dedup` finds evaluation images inside training shards.
"""
