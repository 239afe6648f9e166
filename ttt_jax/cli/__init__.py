"""Command-line entry points: `ttt-jax-train` / `launch/train.py`, `ttt-jax-sample` /
`launch/sample.py` (absl flags + ml-collections config files)."""
