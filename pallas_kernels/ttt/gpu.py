"""TTT forward and backward as Pallas Triton kernels (GPU; interpret mode on CPU), TTT-MLP or
TTT-Linear (`kind`; the mini-batch math is `tile.step`, sizes below are TTT-MLP's).

Why Triton here: the kernel is a sequential loop with a large loop-carried state and small
matmuls, which Triton expresses directly (`lax.fori_loop` over refs) for every kind, head dim,
mini-batch size and dtype, and Pallas Triton lowers on a CPU-only host for an abstract H100, so
CI checks that it stays lowerable (jax 0.11/0.12's Mosaic GPU lowering is registered only with
the CUDA plugin). TTT-MLP's bf16 forward at b = d = 64, the training shape, has a Mosaic GPU
kernel with the state split over a cluster of CTAs (`gpu_cluster.py`; 4 a head, or 8 where
that grid fits one wave: `cluster_size`), chosen by the block-size table; Pallas marks its
Triton backend as deprecated, so the rest follows once a GPU is at hand to measure both.

Design: one program per (batch element, head), grid (B, H). Each program loads its initial
state W1 [d, 4d], b1 [1, 4d], W2 [4d, d], b2 [1, d] once, then runs a `lax.fori_loop` over the
N mini-batches with the state carried as float32 loop values, reading mini-batch n of XQ, XK, XV
and eta by a dynamic index into the refs and writing that mini-batch's output. The mini-batch
math is `tile.step`. The state is written to memory only every `checkpoint_group`
mini-batches (the state at the start of each group, [B, H, ceil(N/g), ...]), which is what the
backward pass recomputes from.

Backward (`backward`), a `lax.scan` over the groups, last first, of two kernel calls each:
`forward` from the group's checkpoint (per example) with g = 1 writes the g states the group
passes through ([B, H, g, ...] in HBM: 2 MiB per head at g = 16), then `_backward_kernel`, one
program per (batch, head), walks the group in reverse with `tile.step_vjp`, reading state t
and carrying the state's cotangent as loop values. Two calls instead of one because a Triton
program has no scratch memory to hold the g states, and reading back its own HBM writes would
need a barrier between its threads that Pallas Triton does not expose. The state after
mini-batch t is state t + 1 of the same stack, so the VJP takes it from there (`next_state`)
instead of stepping state t again, for all but the group's last mini-batch, which runs apart:
that drops the update's two state products from each VJP (45.9 -> 41.6 MFLOP a mini-batch of
TTT-MLP at b = d = 64, XLA's cost analysis), as the TPU backward does. Where the backward's
working set does not fit one SM's shared memory (TTT-MLP at d = 64: 420 KiB requested, 227 KiB
on an H100, measured by compiling for it), the reverse sweep runs as XLA over the same
`tile.step_vjp` (`_backward_group_xla`), except where the cluster split takes both halves:
with `block_sizes.cluster` at bf16, b = d = 64, each group is recomputed by
`gpu_cluster.forward` (W1, W2 saved as their bf16 operands, no output) and swept in reverse by
`gpu_cluster_backward.backward_group`, the state's cotangent split over the same CTAs. At
checkpoint_group = 1 there (`stores_states`) the forward saves those bf16 states itself and the
backward is one `backward_group` over the whole sequence, with no recompute: the forward's
work is not done twice, at the cost of every state held from the forward to the backward.

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
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.ttt import gpu_cluster, gpu_cluster_backward, tile
from pallas_kernels.ttt.block_sizes import BlockSizes
from pallas_kernels.ttt.tile import (num_groups, pad_to_groups, state_bytes, state_shapes,
                                     step_vjp)


def _mosaic_interpret(interpret: bool):
  """The cluster kernels' `interpret`: jax's Mosaic GPU interpreter when interpreting."""
  return plgpu.InterpretGPUParams() if interpret else False


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
    state, out = tile.step(kind, gamma, beta, eps, state, XQ, XK, XV, eta)
    out_ref[pl.ds(n, 1)] = out.astype(out_ref.dtype)[None]
    return state

  jax.lax.fori_loop(0, num_mini_batches, body, state)


@functools.partial(jax.jit, static_argnames=("kind", "eps", "checkpoint_group", "interpret",
                                             "debug", "block_sizes", "per_example_init"))
def forward(xq, xk, xv, eta, ln_weight, ln_bias, init, *, kind: str, eps: float,
            checkpoint_group: int, interpret: bool, debug: bool = False,
            block_sizes: BlockSizes = BlockSizes(), per_example_init: bool = False):
  """Kernel call. xq, xk, xv: [B, H, N, b, d]; eta: [B, H, N, b]; ln_weight, ln_bias: [H, d];
  init: the initial state [H, ...] of `tile.state_shapes(kind, d)` in the state dtype
  ([B, H, ...] with per_example_init, as the backward restarts from saved states).

  Returns (out [B, H, N, b, d] in xq's dtype, checkpoints: each state array
  [B, H, ceil(N/g), ...] in the state dtype, the state at the start of each group of g).

  Runs the Mosaic GPU cluster kernel (`gpu_cluster.forward`) instead where the block sizes
  ask for it and `gpu_cluster.supports` the shape (`cluster_size`), so the backward's
  recompute uses the same kernel as the forward.
  """
  B, H, N, b, d = xq.shape
  if P := cluster_size(kind, xq.dtype, xq.shape, block_sizes):
    stored = stores_states(kind, xq.dtype, xq.shape, checkpoint_group, block_sizes)
    # The backward's stack of states is laid out for its own split: one warpgroup there.
    W = block_sizes.warpgroups
    W = W if not stored and gpu_cluster.supports(kind, xq.dtype, b, d, P, W) else 1
    return gpu_cluster.forward(
        xq, xk, xv, eta, ln_weight, ln_bias, init, eps=eps, checkpoint_group=checkpoint_group,
        cluster=P, warpgroups=W, interpret=_mosaic_interpret(interpret), debug=debug,
        per_example_init=per_example_init,
        weights_dtype=jnp.bfloat16 if stored else jnp.float32)
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

  per_example = lambda *shape: pl.BlockSpec((None, None, *shape),
                                            lambda i, j: (i, j) + (0,) * len(shape))
  state_spec = per_example if per_example_init else per_head

  kernel = functools.partial(_kernel, kind=kind, eps=eps, checkpoint_group=checkpoint_group,
                             num_mini_batches=N)
  return pl.pallas_call(
      kernel,
      grid=(B, H),
      in_specs=[x_spec, x_spec, x_spec, eta_spec, per_head(1, d), per_head(1, d),
                *(state_spec(*s) for s in shapes)],
      out_specs=(x_spec, tuple(ckpt(*s) for s in shapes)),
      out_shape=(jax.ShapeDtypeStruct(xq.shape, xq.dtype),
                 tuple(jax.ShapeDtypeStruct((B, H, G, *s), dtype) for s in shapes)),
      compiler_params=pltriton.CompilerParams(num_warps=block_sizes.num_warps,
                                              num_stages=block_sizes.num_stages),
      interpret=interpret,
      debug=debug,
      name=f"{kind}_forward_triton",
  )(xq, xk, xv, eta, gamma, beta, *init)


def _backward_kernel(xq_ref, xk_ref, xv_ref, eta_ref, gamma_ref, beta_ref, *refs, kind, eps, g):
  """One (batch, head) of one group. Refs: x [g, b, d], eta [g, b, 1], gamma/beta [1, d], the
  states before each mini-batch [g, ...] (k arrays), ct_out [g, b, d], the cotangent of the
  group's final state (k arrays); outputs the cotangents of x and eta (like the inputs), of
  gamma and beta [1, d] (this group's share) and of the group's initial state (k arrays)."""
  k = (len(refs) - 7) // 3  # k states, ct_out, k ct_state; 4 + 2 outputs, k ct_state outputs
  states, ct_out_ref, ct_final = refs[:k], refs[k], refs[k + 1:2 * k + 1]
  dx_refs, (dgamma, dbeta), ct_init = refs[2 * k + 1:2 * k + 5], refs[2 * k + 5:2 * k + 7], \
      refs[2 * k + 7:]
  dtype = states[0].dtype
  gamma, beta = gamma_ref[...], beta_ref[...]  # [1, d]
  at = lambda refs, t: tuple(r[pl.ds(t, 1)][0] for r in refs)

  def vjp(t, carry, next_state=None):  # mini-batch t; next_state: the state after it
    ct_gamma, ct_beta, ct_state = carry
    *xs, ct_out = (x.astype(dtype) for x in at((xq_ref, xk_ref, xv_ref, eta_ref, ct_out_ref), t))
    ct_state, *ct_x, ct_g, ct_b = step_vjp(kind, gamma, beta, eps, at(states, t), *xs, ct_state,
                                           ct_out, next_state=next_state)
    for r, c in zip(dx_refs, ct_x):
      r[pl.ds(t, 1)] = c.astype(r.dtype)[None]
    return ct_gamma + ct_g, ct_beta + ct_b, ct_state

  # The last mini-batch first, apart: the state after it is not among `states`, so its VJP
  # recomputes it. Every earlier t takes it from states[t + 1], which leaves the update's two
  # state products out of the VJP (`tile.step_vjp`).
  zeros = jnp.zeros(gamma.shape, dtype)
  carry = vjp(g - 1, (zeros, zeros, tuple(r[...] for r in ct_final)))
  ct_gamma, ct_beta, ct_state = jax.lax.fori_loop(
      0, g - 1, lambda i, c: vjp(g - 2 - i, c, at(states, g - 1 - i)), carry)
  dgamma[...], dbeta[...] = ct_gamma, ct_beta
  for r, c in zip(ct_init, ct_state):
    r[...] = c


# Measured by compiling for an H100 (compile-only devices, jax 0.12, bf16 inputs): the backward
# kernel's working set (state, its cotangent and the vjp's temporaries, all f32) fits the 227 KiB
# of shared memory per block for TTT-MLP at d = 16 and 32 and TTT-Linear at d = 64 (state 8, 33
# and 17 KiB) and does not for TTT-Linear at d = 128 (66 KiB of state: 240 KiB requested) or
# TTT-MLP at d = 64 (131 KiB: 420 KiB requested). Up to this many bytes of state per head the
# kernel is used; above it the group's reverse sweep is XLA (`_backward_group_xla`).
_KERNEL_STATE_BYTES = 64 << 10


def stores_states(kind: str, dtype, shape, checkpoint_group: int,
                  block_sizes: BlockSizes) -> bool:
  """Whether `forward` saves every state as the cluster backward reads it (W1, W2 as their
  bf16 operands, b1, b2 in f32; N + 1, the final state too) and `backward` sweeps them without
  recomputing: at checkpoint_group = 1 on the cluster kernels. The forward then writes what
  the backward's recompute would (65 KiB a head per mini-batch at d = 64, held until the
  backward: 16.4 GiB per batch element at 63 s with 48 heads), and the backward is one kernel
  call."""
  P = cluster_size(kind, dtype, shape, block_sizes)
  return (checkpoint_group == 1 and bool(P)
          and gpu_cluster_backward.supports(kind, dtype, shape[3], shape[4], P))


def cluster_size(kind: str, dtype, shape, block_sizes: BlockSizes) -> int:
  """CTAs per head of the cluster kernels, forward and backward, for xq's shape
  [B, H, N, b, d] (0: the Triton kernels): `block_sizes.wave_cluster` where its B x H x P CTAs
  fit one wave of `block_sizes.sms` (clusters of P on whole multiples of P SMs; an estimate,
  as the GPCs' SM counts may leave fewer) and the kernels take it, else
  `block_sizes.cluster` where they take it."""
  B, H, _, b, d = shape
  wave, sms = block_sizes.wave_cluster, block_sizes.sms
  if wave and (not sms or B * H * wave <= sms // wave * wave):
    if gpu_cluster.supports(kind, dtype, b, d, wave):
      return wave
  P = block_sizes.cluster
  return P if P and gpu_cluster.supports(kind, dtype, b, d, P) else 0


def backward_fits_kernel(kind: str, d: int) -> bool:
  """Whether the Triton backward kernel fits one SM for this inner model and head dim."""
  return state_bytes(kind, d) <= _KERNEL_STATE_BYTES


def _backward_group_xla(kind, eps, xs, gamma, beta, states, ct_out, ct_final):
  """`_backward_group` as XLA: `tile.step_vjp` vmapped over (batch, head), scanned over the
  group in reverse. Same arguments and results."""
  B, H, g = xs[0].shape[:3]
  dtype = states[0].dtype
  gamma, beta = (jnp.broadcast_to(t, (B, *t.shape)) for t in (gamma, beta))  # [B, H, 1, d]
  vjp = jax.vmap(jax.vmap(functools.partial(step_vjp, kind, eps=eps)))
  at = lambda t: lambda x: x[:, :, t].astype(dtype)

  def step(carry, t, next_state=None):  # mini-batch t; next_state: the state after it
    ct_gamma, ct_beta, ct_state = carry
    x = at(t)
    ct_state, *ct_x, ct_g, ct_b = vjp(gamma, beta, state=tuple(map(x, states)), XQ=x(xs[0]),
                                      XK=x(xs[1]), XV=x(xs[2]), eta=x(xs[3]),
                                      ct_state=ct_state, ct_out=x(ct_out), next_state=next_state)
    return (ct_gamma + ct_g, ct_beta + ct_b, ct_state), tuple(ct_x)

  # The last mini-batch apart, as in `_backward_kernel`: the others take the state after them
  # from `states` (t + 1) instead of recomputing it.
  zeros = jnp.zeros_like(gamma)
  carry, last = step((zeros, zeros, tuple(ct_final)), g - 1)
  (ct_gamma, ct_beta, ct_init), ct_xs = jax.lax.scan(
      lambda c, t: step(c, t, tuple(map(at(t + 1), states))), carry, jnp.arange(g - 1),
      reverse=True)
  ct_xs = tuple(jnp.concatenate([jnp.moveaxis(c, 0, 2), l[:, :, None]], axis=2).astype(x.dtype)
                for c, l, x in zip(ct_xs, last, xs))
  return (*ct_xs, ct_gamma, ct_beta, *ct_init)


def _backward_group(kind, eps, xs, gamma, beta, states, ct_out, ct_final, interpret, debug,
                    block_sizes):
  """`_backward_kernel` over the (B, H) grid for one group: xs [B, H, g, ...], gamma/beta
  [H, 1, d], states [B, H, g, ...], ct_out [B, H, g, b, d], ct_final [B, H, ...]."""
  B, H, g = xs[0].shape[:3]
  block = lambda x: pl.BlockSpec((None, None, *x.shape[2:]),
                                 lambda i, j, n=x.ndim - 2: (i, j) + (0,) * n)
  per_head = pl.BlockSpec((None, *gamma.shape[1:]), lambda i, j: (j, 0, 0))
  ins = (*xs, gamma, beta, *states, ct_out, *ct_final)
  outs = (*xs, jax.ShapeDtypeStruct((B, H, *gamma.shape[1:]), gamma.dtype),
          jax.ShapeDtypeStruct((B, H, *beta.shape[1:]), beta.dtype), *ct_final)
  return pl.pallas_call(
      functools.partial(_backward_kernel, kind=kind, eps=eps, g=g),
      grid=(B, H),
      in_specs=[block(x) if x.ndim > 3 else per_head for x in ins],
      out_specs=[block(x) for x in outs],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in outs],
      compiler_params=pltriton.CompilerParams(num_warps=block_sizes.num_warps,
                                              num_stages=block_sizes.num_stages),
      interpret=interpret,
      debug=debug,
      name=f"{kind}_backward_triton",
  )(*ins)


@functools.partial(jax.jit, static_argnames=("kind", "eps", "checkpoint_group", "interpret",
                                             "debug", "block_sizes"))
def backward(xq, xk, xv, eta, ln_weight, ln_bias, checkpoints, ct_out, *, kind: str, eps: float,
             checkpoint_group: int, interpret: bool, debug: bool = False,
             block_sizes: BlockSizes = BlockSizes()):
  """Cotangents of `forward`'s output from its checkpoints; arguments and results as
  `tpu.backward` (per batch element for ln_weight, ln_bias and the initial state)."""
  B, H, N, b, d = xq.shape
  G, g = checkpoints[0].shape[2], checkpoint_group
  dtype = checkpoints[0].dtype
  # The last group is padded to g mini-batches with eta = 0 and a zero output cotangent.
  to_groups = lambda x: jnp.moveaxis(pad_to_groups(x, G, g).reshape(B, H, G, g, *x.shape[3:]),
                                     2, 0)
  from_groups = lambda x: jnp.moveaxis(x, 0, 2).reshape(B, H, G * g, *x.shape[4:])[:, :, :N]
  gamma = ln_weight.astype(dtype)[:, None, :]  # [H, 1, d]
  beta = ln_bias.astype(dtype)[:, None, :]
  kw = dict(interpret=interpret, debug=debug, block_sizes=block_sizes)

  in_kernel = backward_fits_kernel(kind, d)
  P = cluster_size(kind, xq.dtype, xq.shape, block_sizes)  # as the forward's
  on_cluster = bool(P) and gpu_cluster_backward.supports(kind, xq.dtype, b, d, P)
  if stores_states(kind, xq.dtype, xq.shape, g, block_sizes):  # every state saved: no recompute
    f32 = jnp.float32  # (the stack's W2 may be W2^T: the state's own shapes)
    ct_final = tuple(jnp.zeros((B, H, *shape), f32) for shape in state_shapes(kind, d))
    *ct_xs, ct_gamma, ct_beta, ct_init = gpu_cluster_backward.backward_group(
        (xq, xk, xv, eta), ln_weight, ln_bias, checkpoints, ct_out, ct_final, eps=eps,
        cluster=P, interpret=_mosaic_interpret(interpret), debug=debug)
    ct_xs[3] = ct_xs[3].astype(eta.dtype)
    return (*ct_xs, ct_gamma.astype(f32), ct_beta.astype(f32), ct_init)

  def cluster_step(ct_final, group):  # the Mosaic GPU pair, state split over P CTAs
    xs, ckpt, ct = group
    mosaic = dict(eps=eps, cluster=P, interpret=_mosaic_interpret(interpret), debug=debug)
    _, states = gpu_cluster.forward(*xs, ln_weight, ln_bias, ckpt, checkpoint_group=1,
                                    per_example_init=True, weights_dtype=jnp.bfloat16,
                                    output=False, **mosaic)
    *ct_xs, ct_gamma, ct_beta, ct_init = gpu_cluster_backward.backward_group(
        xs, ln_weight, ln_bias, states, ct, ct_final, **mosaic)
    ct_xs[3] = ct_xs[3][..., None].astype(xs[3].dtype)
    return tuple(ct_init), (*ct_xs, ct_gamma[:, :, None], ct_beta[:, :, None])

  def step(ct_final, group):  # group k, last first: inputs [B, H, g, ...], checkpoint [B, H, ...]
    if on_cluster:
      return cluster_step(ct_final, group)
    xs, ckpt, ct = group
    _, states = forward(*xs, ln_weight, ln_bias, ckpt, kind=kind, eps=eps, checkpoint_group=1,
                        per_example_init=True, **kw)  # the g states, [B, H, g, ...]
    args = (kind, eps, (*xs[:3], xs[3][..., None]), gamma, beta, states, ct, ct_final)
    outs = _backward_group(*args, **kw) if in_kernel else _backward_group_xla(*args)
    return tuple(outs[6:]), tuple(outs[:6])

  ct_final = tuple(jnp.zeros(c.shape[:2] + c.shape[3:], dtype) for c in checkpoints)
  ct_init, (ct_q, ct_k, ct_v, ct_eta, ct_gamma, ct_beta) = jax.lax.scan(
      step, ct_final, (tuple(map(to_groups, (xq, xk, xv, eta))),
                       tuple(jnp.moveaxis(c, 2, 0) for c in checkpoints), to_groups(ct_out)),
      reverse=True)
  return (from_groups(ct_q), from_groups(ct_k), from_groups(ct_v), from_groups(ct_eta)[..., 0],
          ct_gamma.sum(0)[:, :, 0], ct_beta.sum(0)[:, :, 0], ct_init)
