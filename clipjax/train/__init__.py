"""Pretraining: `program` (sharded state layout + jitted step, what `clipjax compile` lowers),
`step` (the pure step, GradCache accumulation), `state`, `checkpointing`, `warmstart`,
`recipes` (published recipes for `configs/`) and `loop` (what `clipjax train` runs)."""
