"""Weight import/export between clipjax and OpenAI / open_clip checkpoints."""
