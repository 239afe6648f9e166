"""Samples videos from a storyboard with a trained model (spec 4).

The flags are in ttt_jax/cli/sample.py (`--helpfull`); also installed as `ttt-jax-sample`.
"""

from ttt_jax.cli.sample import run

if __name__ == "__main__":
  run()
