"""Trains one curriculum stage, or several in a row.

The flags are in ttt_jax/cli/train.py (`--helpfull`); also installed as `ttt-jax-train`.
"""

from ttt_jax.cli.train import run

if __name__ == "__main__":
  run()
