"""Sampling: storyboard -> multi-scene video (upstream sampler, dynamic CFG)."""
