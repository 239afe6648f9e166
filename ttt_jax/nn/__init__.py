"""Flax nnx modules: parameters and their names; the math lives in `ttt_jax.ops`."""

from ttt_jax.nn.ttt_layer import (TTTLayer, UPSTREAM_NAMES, load_upstream_state_dict,
                                  upstream_state_dict)

__all__ = ["TTTLayer", "UPSTREAM_NAMES", "load_upstream_state_dict", "upstream_state_dict"]
