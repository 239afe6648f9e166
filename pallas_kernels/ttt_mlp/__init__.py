"""TTT-MLP as a Pallas kernel: Triton-style forward, recompute-per-group backward.

`ttt_mlp` has the signature and semantics of `ttt_jax.ops.ttt_mlp` (without `return_state`)
plus `interpret` and `debug` flags.
"""

from pallas_kernels.ttt_mlp.block_sizes import BlockSizes, get_block_sizes
from pallas_kernels.ttt_mlp.op import ttt_mlp

__all__ = ["BlockSizes", "get_block_sizes", "ttt_mlp"]
