"""Training: diffusion loss, optimiser, the sharded train step, checkpoints, the loop."""
