"""TTT-MLP and TTT-Linear as Pallas kernels: Mosaic TPU and Triton forward and backward, and
Mosaic GPU TTT-MLP forward and backward with the state split over a CTA cluster.

`ttt_mlp` and `ttt_linear` have the signatures and semantics of `ttt_jax.ops.ttt_mlp` /
`ttt_linear` (without `return_state`) plus `backend`, `interpret`, `debug` and `block_sizes`.
"""

from pallas_kernels.ttt.block_sizes import BlockSizes, get_block_sizes, vmem_capacity
from pallas_kernels.ttt.op import ttt_linear, ttt_mlp

__all__ = ["BlockSizes", "get_block_sizes", "ttt_linear", "ttt_mlp", "vmem_capacity"]
