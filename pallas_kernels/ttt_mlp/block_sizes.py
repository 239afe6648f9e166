"""Tuning table for the TTT-MLP kernels, keyed by (device kind prefix, dtype, head_dim).

The forward kernel runs one program per (batch, head), so its only tunables are Triton's
`num_warps` and `num_stages`. No entry has been measured yet (no GPU was available when they
were written): 8 warps for d = 64 is a guess that gives the large loop-carried state (W1, W2:
2 x 64 KiB in f32) more registers, and one stage because the loop carries the state, leaving
little to software-pipeline. Replace them with measured values and say so beside each entry.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Triton compiler parameters of the forward kernel."""
  num_warps: int = 4
  num_stages: int = 1  # the mini-batch loop carries the state: nothing to software-pipeline


DEFAULT = BlockSizes()

# (device kind prefix, input dtype name or None for any, head_dim or None for any) -> sizes.
# The first matching entry wins; device kinds are matched case-insensitively by prefix.
TABLE: tuple[tuple[tuple[str, str | None, int | None], BlockSizes], ...] = (
    (("NVIDIA H100", None, 64), BlockSizes(num_warps=8, num_stages=1)),  # untuned
    (("NVIDIA H200", None, 64), BlockSizes(num_warps=8, num_stages=1)),  # untuned
)


def get_block_sizes(device_kind: str, dtype, head_dim: int) -> BlockSizes:
  """The table entry for this device kind, input dtype and head dim, else `DEFAULT`."""
  name = jnp.dtype(dtype).name
  for (kind, want_dtype, want_d), sizes in TABLE:
    if (device_kind.lower().startswith(kind.lower()) and want_dtype in (None, name)
        and want_d in (None, head_dim)):
      return sizes
  return DEFAULT
