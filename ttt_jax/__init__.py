"""ttt-jax: One-Minute Video Generation with Test-Time Training, in JAX."""
