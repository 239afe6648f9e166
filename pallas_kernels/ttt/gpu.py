"""TTT forward as a Pallas Triton kernel (GPU; interpret mode on CPU), TTT-MLP or TTT-Linear
(`kind`; the mini-batch math is `tile.STEPS[kind]`, sizes below are TTT-MLP's).

Why Triton and not Mosaic GPU: the kernel is a sequential loop with a large loop-carried state
and small matmuls, which Triton expresses directly (`lax.fori_loop` over refs), and Pallas
Triton lowers on a CPU-only host for an abstract H100, so CI checks that it stays lowerable;
jax 0.11/0.12's Mosaic GPU lowering is registered only with the CUDA plugin (see
jax-stack-notes). Pallas marks its Triton backend as deprecated in favour of Mosaic GPU, so a
port is the next step once a GPU is at hand to measure both.

Design: one program per (batch element, head), grid (B, H). Each program loads its initial
state W1 [d, 4d], b1 [1, 4d], W2 [4d, d], b2 [1, d] once, then runs a `lax.fori_loop` over the
N mini-batches with the state carried as float32 loop values, reading mini-batch n of XQ, XK, XV
and eta by a dynamic index into the refs and writing that mini-batch's output. The mini-batch
math is `tile.STEPS[kind]`. The state is written to memory only every `checkpoint_group`
mini-batches (the state at the start of each group, [B, H, ceil(N/g), ...]), which is what the
backward pass recomputes from (on GPU with XLA, `op._bwd_xla`).

The work of one (b, h) is sequential over N, so the parallelism is the B x H programs only (the
SMs are not all busy when B * H is below their count, e.g. 48 heads on 132 SMs); it is the
simplest layout. Triton decides where the loop-carried state lives: at d = 64 it is 128 KiB
(W1 + W2) plus [b, 4d] temporaries of 64 KiB each, more than one program's registers, so expect
spills to local memory (L1/L2) until this is measured on a GPU. The TPU kernels (`tpu.py`)
instead put N on an 'arbitrary' grid axis and keep the state in VMEM scratch.
"""
from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.ttt.block_sizes import BlockSizes
from pallas_kernels.ttt.tile import STEPS, num_groups, state_shapes


def _kernel(xq_ref, xk_ref, xv_ref, eta_ref, gamma_ref, beta_ref, *refs, kind, eps,
            checkpoint_group, num_mini_batches):
  """One (batch, head). Refs: x [N, b, d], eta [N, b, 1], gamma/beta [1, d], the initial state
  arrays of `tile.state_shapes(kind, d)`; outputs out [N, b, d] and the checkpoints [G, ...] of
  each state array."""
  init, out_ref, ckpt_refs = refs[:-2], refs[-2], refs[-1]
  dtype = init[0].dtype
  gamma, beta = gamma_ref[...], beta_ref[...]  # [1, d]
  state = tuple(r[...] for r in init)

  def body(n, state):
    # lax.rem / lax.div: n >= 0, and jnp's floor-mod does not lower to Triton.
    @pl.when(jax.lax.rem(n, checkpoint_group) == 0)
    def _save():  # state at the start of group n // g
      k = jax.lax.div(n, checkpoint_group)
      for ref, w in zip(ckpt_refs, state):
        ref[pl.ds(k, 1)] = w[None]

    XQ, XK, XV = (ref[pl.ds(n, 1)][0].astype(dtype) for ref in (xq_ref, xk_ref, xv_ref))
    eta = eta_ref[pl.ds(n, 1)][0].astype(dtype)  # [b, 1]
    state, out = STEPS[kind](gamma, beta, eps, state, XQ, XK, XV, eta)
    out_ref[pl.ds(n, 1)] = out.astype(out_ref.dtype)[None]
    return state

  jax.lax.fori_loop(0, num_mini_batches, body, state)


@functools.partial(jax.jit, static_argnames=("kind", "eps", "checkpoint_group", "interpret",
                                             "debug", "block_sizes"))
def forward(xq, xk, xv, eta, ln_weight, ln_bias, init, *, kind: str, eps: float,
            checkpoint_group: int, interpret: bool, debug: bool = False,
            block_sizes: BlockSizes = BlockSizes()):
  """Kernel call. xq, xk, xv: [B, H, N, b, d]; eta: [B, H, N, b]; ln_weight, ln_bias: [H, d];
  init: the initial state [H, ...] of `tile.state_shapes(kind, d)` in the state dtype.

  Returns (out [B, H, N, b, d] in xq's dtype, checkpoints: each state array
  [B, H, ceil(N/g), ...] in the state dtype, the state at the start of each group of g).
  """
  B, H, N, b, d = xq.shape
  dtype = init[0].dtype
  G = num_groups(N, checkpoint_group)
  eta = eta[..., None]  # [B, H, N, b, 1]: a column, so no reshape is needed in the kernel
  gamma = ln_weight.astype(dtype)[:, None, :]  # [H, 1, d]
  beta = ln_bias.astype(dtype)[:, None, :]
  shapes = state_shapes(kind, d)

  x_spec = pl.BlockSpec((None, None, N, b, d), lambda i, j: (i, j, 0, 0, 0))
  eta_spec = pl.BlockSpec((None, None, N, b, 1), lambda i, j: (i, j, 0, 0, 0))
  per_head = lambda *shape: pl.BlockSpec((None, *shape), lambda i, j: (j,) + (0,) * len(shape))
  ckpt = lambda *shape: pl.BlockSpec((None, None, G, *shape),
                                     lambda i, j: (i, j, 0) + (0,) * len(shape))

  kernel = functools.partial(_kernel, kind=kind, eps=eps, checkpoint_group=checkpoint_group,
                             num_mini_batches=N)
  return pl.pallas_call(
      kernel,
      grid=(B, H),
      in_specs=[x_spec, x_spec, x_spec, eta_spec, per_head(1, d), per_head(1, d),
                *(per_head(*s) for s in shapes)],
      out_specs=(x_spec, tuple(ckpt(*s) for s in shapes)),
      out_shape=(jax.ShapeDtypeStruct(xq.shape, xq.dtype),
                 tuple(jax.ShapeDtypeStruct((B, H, G, *s), dtype) for s in shapes)),
      compiler_params=pltriton.CompilerParams(num_warps=block_sizes.num_warps,
                                              num_stages=block_sizes.num_stages),
      interpret=interpret,
      debug=debug,
      name=f"{kind}_forward_triton",
  )(xq, xk, xv, eta, gamma, beta, *init)
