"""Loading checkpoints: where files come from, how they are cached and read."""
