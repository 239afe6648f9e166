"""Flax nnx modules: parameters and their names; the math lives in `ttt_jax.ops`."""

from ttt_jax.nn.dit import DiT, DiTBlock, timestep_embedding
from ttt_jax.nn.seq_block import SeqModelingBlock
from ttt_jax.nn.ttt_layer import TTTLayer

__all__ = ["DiT", "DiTBlock", "SeqModelingBlock", "TTTLayer", "timestep_embedding"]
