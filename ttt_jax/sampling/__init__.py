"""Sampling: storyboard -> multi-scene video (upstream sampler, dynamic CFG).

  sampler     timesteps, DPM-Solver++(2M) SDE / DDIM tables, dynamic CFG, the jitted loop
  storyboard  .json / .jsonl storyboard files, scene tokens (StoryboardError)
  generate    generate(config, params, graphdef, video, seed=...) -> latents [T, C, H, W]
  video       tiny-codec decode, mp4 and contact-sheet writers

`launch/sample.py` is the command line.
"""
