"""Training: the sharded step, optimizer, state, checkpoints and the outer loop."""
