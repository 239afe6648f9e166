"""The pure-jnp reference the kernels are tested against: `ttt_jax.ops.ttt_mlp` itself."""

from ttt_jax.ops import ttt_mlp

__all__ = ["ttt_mlp"]
