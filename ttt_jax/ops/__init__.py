"""Pure array functions: the TTT inner loops. One implementation, used by the layer, the
kernels' tests and the benchmarks."""

from ttt_jax.ops.ttt import (IMPLS, TTTLinearState, TTTMLPState, gelu_tanh, gelu_tanh_grad, layer_norm,
                             ln_l2_grad, scan_remat, ttt_flops, ttt_linear, ttt_mlp)

__all__ = [
    "IMPLS", "TTTLinearState", "TTTMLPState", "gelu_tanh", "gelu_tanh_grad", "layer_norm", "ln_l2_grad",
    "scan_remat", "ttt_flops", "ttt_linear", "ttt_mlp",
]
