"""The pure-jnp references the kernels are tested against: `ttt_jax.ops` itself."""

from ttt_jax.ops import ttt_linear, ttt_mlp

__all__ = ["ttt_linear", "ttt_mlp"]
