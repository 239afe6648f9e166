"""Pallas kernels for the TTT inner loops, one package per kernel family.

Each package holds a pure-jnp `reference` (a thin call into `ttt_jax.ops`, never a second copy
of the math), the Pallas kernels, the public `jax.custom_vjp` op and its tuning table.
"""
