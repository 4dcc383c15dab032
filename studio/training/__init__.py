"""Training: the config, the objectives, checkpoints and the one engine every method trains through."""
