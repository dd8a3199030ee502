"""The training engine: the loop, gradient accumulation, the non-finite step guard, checkpoints."""
