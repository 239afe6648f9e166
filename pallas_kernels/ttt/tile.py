"""One TTT mini-batch on 2-D tiles: the math every TTT kernel runs, in one place.

`step` is one mini-batch of one (batch element, head) of `ttt_jax.ops.ttt`'s `_mlp_mini_batch`
(TTT-MLP: `mlp_update`, then `mlp_output`) or `_linear_mini_batch` (TTT-Linear: `linear_update`,
`linear_output`), built from the same helpers
(`layer_norm`, `ln_l2_grad`, `gelu_tanh`, `gelu_tanh_grad`), with 2-D matmuls that both Triton
and Mosaic TPU lower, in the primal form of the spec's steps 1-8 (3.6), as the reference's
kernel: the state is updated first and the output taken with the updated weights
(Z1_bar = XQ W1' + b1'), where the pure op uses the dual form (XQ W1 - Attn (eta G1) + ...).
With one eta row for the whole mini-batch the two are the same function; the primal form skips
the two b x b attention matrices and their products (26% fewer FLOPs), and the tests compare
the kernels with the pure op. The backward kernels differentiate the two halves with `jax.vjp`
inside the kernel body (`step_vjp`), so there is no hand-written gradient to drift from them;
the split lets a kernel that holds the state after a mini-batch start the output's half from
it instead of stepping the state again.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from ttt_jax.ops.ttt import gelu_tanh, gelu_tanh_grad, layer_norm, ln_l2_grad


def num_groups(num_mini_batches: int, checkpoint_group: int) -> int:
  """How many state checkpoints the forward saves: one per group of g mini-batches."""
  return math.ceil(num_mini_batches / checkpoint_group)


def _dot(a, b, contract=(1, 0), operands=None):
  """2-D matmul contracting a's axis contract[0] with b's axis contract[1], accumulated in
  a's dtype (the state dtype, f32), on operands rounded to `operands` (None: a's dtype).

  At jax's default matmul precision, as the pure op's einsums: one bf16 pass on the TPU MXU
  and TF32 on GPU tensor cores unless `jax.default_matmul_precision` (read when the kernel is
  traced) asks for more, so kernel and pure op round at one precision on every platform.
  HIGHEST costs the TPU forward 2.3x the bundles of its mini-batch loop on a v5p (2,087 vs 897
  a head on f32 inputs; 837 on bf16 operands: benchmarks/tpu_schedule.py)."""
  if operands is None or jnp.dtype(operands) == a.dtype:
    return _general(a, b, contract, a.dtype)
  return _narrow_dot(a, b, contract, jnp.dtype(operands))


def _general(a, b, contract, out_dtype, precision=None):
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                             precision=precision, preferred_element_type=out_dtype)


# bf16 operands take one MXU pass whatever jax's default precision: said explicitly, as Mosaic
# TPU refuses bf16 operands with an f32 precision ("Bad lhs type").
_NARROW = jax.lax.Precision.DEFAULT


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _narrow_dot(a, b, contract, operands):
  """`_dot` of a and b (one dtype) rounded to the narrower `operands` (bf16), accumulated in
  their dtype. Its VJP's two products take the same operands, the cotangent rounded too
  (autodiff would pair an f32 cotangent with a bf16 operand)."""
  return _general(a.astype(operands), b.astype(operands), contract, a.dtype, _NARROW)


def _narrow_dot_fwd(a, b, contract, operands):
  out = a.dtype
  a, b = a.astype(operands), b.astype(operands)
  return _general(a, b, contract, out, _NARROW), (a, b)


def _narrow_dot_bwd(contract, operands, res, ct):
  a, b = res  # a [m, k] (contract[0] = 1) or [k, m]; b [k, n] (contract[1] = 0) or [n, k]
  (ca, cb), out, ct = contract, ct.dtype, ct.astype(operands)  # ct [m, n]
  dot = functools.partial(_general, out_dtype=out, precision=_NARROW)
  ct_a = dot(ct, b, (1, 1 - cb)) if ca else dot(b, ct, (1 - cb, 1))
  ct_b = dot(a, ct, (1 - ca, 0)) if cb == 0 else dot(ct, a, (0, 1 - ca))
  return ct_a, ct_b  # sums over n and over m


_narrow_dot.defvjp(_narrow_dot_fwd, _narrow_dot_bwd)


def _products(operands):
  """a @ b, a @ b^T and a^T @ b on `operands` (see `_dot`)."""
  return (functools.partial(_dot, contract=(1, 0), operands=operands),
          functools.partial(_dot, contract=(1, 1), operands=operands),
          functools.partial(_dot, contract=(0, 0), operands=operands))


def mlp_update(gamma, beta, eps, state, XK, XV, eta, operands=None):
  """The TTT-MLP state after one mini-batch on one (batch, head): spec 3.6 steps 1-6.

  Args:
    gamma, beta: [1, d] inner LayerNorm parameters.
    eps: LayerNorm epsilon.
    state: (W1 [d, f], b1 [1, f], W2 [f, d], b2 [1, d]).
    XK, XV: [b, d]; eta: [b, 1] (a column: it scales the rows of the gradients).
    operands: the dtype the matmul operands are rounded to (None: the state's). The TPU
      kernels pass bf16 for bf16 inputs: the reference's recipe (bf16 operands, f32
      accumulation, spec 3.10), the MXU's one pass either way, in half the vregs.

  Returns:
    The new state, in the state's dtype.
  """
  W1, b1, W2, b2 = state
  mm, mm_t, tm = _products(operands)
  Z1 = mm(XK, W1) + b1  # [b, f]
  X2 = gelu_tanh(Z1)
  Z2 = mm(X2, W2) + b2  # [b, d]
  G2 = ln_l2_grad(Z2, XV - XK, gamma, beta, eps)  # [b, d]
  G1 = mm_t(G2, W2) * gelu_tanh_grad(Z1)  # [b, f]
  eG1, eG2 = eta * G1, eta * G2
  return (W1 - tm(XK, eG1), b1 - eG1.sum(0, keepdims=True),
          W2 - tm(X2, eG2), b2 - eG2.sum(0, keepdims=True))


def mlp_output(gamma, beta, eps, state, XQ, operands=None):
  """The output [b, d] of the updated inner model (spec 3.6 steps 7-8; primal form, see the
  module docstring): `state` is `mlp_update`'s result, XQ [b, d]."""
  W1, b1, W2, b2 = state
  mm, _, _ = _products(operands)
  X2_bar = gelu_tanh(mm(XQ, W1) + b1)  # [b, f]
  return XQ + layer_norm(mm(X2_bar, W2) + b2, gamma, beta, eps)  # [b, d]


def linear_update(gamma, beta, eps, state, XK, XV, eta, operands=None):
  """The TTT-Linear state after one mini-batch: as `mlp_update` with state (W1 [d, d],
  b1 [1, d])."""
  W1, b1 = state
  mm, _, tm = _products(operands)
  Z1 = mm(XK, W1) + b1  # [b, d]
  eG1 = eta * ln_l2_grad(Z1, XV - XK, gamma, beta, eps)
  return W1 - tm(XK, eG1), b1 - eG1.sum(0, keepdims=True)


def linear_output(gamma, beta, eps, state, XQ, operands=None):
  """The TTT-Linear output of the updated state, as `mlp_output`."""
  W1, b1 = state
  mm, _, _ = _products(operands)
  return XQ + layer_norm(mm(XQ, W1) + b1, gamma, beta, eps)


# kind: (update, output), the two halves of one mini-batch.
_HALVES = {"ttt_mlp": (mlp_update, mlp_output), "ttt_linear": (linear_update, linear_output)}


def update(kind, gamma, beta, eps, state, XK, XV, eta, operands=None):
  """The state after one mini-batch of `kind` (`mlp_update` or `linear_update`)."""
  return _HALVES[kind][0](gamma, beta, eps, state, XK, XV, eta, operands)


def step(kind, gamma, beta, eps, state, XQ, XK, XV, eta, operands=None):
  """One mini-batch of `kind` on one (batch, head): (new state, out [b, d]), both in the
  state's dtype. Arguments as `mlp_update`'s, XQ [b, d]."""
  update_half, output_half = _HALVES[kind]
  state = update_half(gamma, beta, eps, state, XK, XV, eta, operands)
  return state, output_half(gamma, beta, eps, state, XQ, operands)


def _diagonal_sum(v, n: int, axis: int):
  """v ([1, n] or [n, 1]) broadcast to [n, n], masked to the diagonal, summed along `axis`:
  a row <-> column move from lane/sublane reductions only (no transpose)."""
  eye = (jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
         == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1))
  return jnp.sum(jnp.where(eye, jnp.broadcast_to(v, (n, n)), 0), axis=axis, keepdims=True)


def row_to_column(v):
  """[1, n] -> [n, 1] without a transpose (Mosaic TPU lays out a [1, n] row in one sublane and
  an [n, 1] column across sublanes): the diagonal of the broadcast row, summed along lanes."""
  return _diagonal_sum(v, v.shape[1], axis=1)


def column_to_row(v):
  """[n, 1] -> [1, n], as `row_to_column`."""
  return _diagonal_sum(v, v.shape[0], axis=0)


def state_shapes(kind: str, d: int) -> tuple[tuple[int, int], ...]:
  """Per-head shapes of the inner model's state: (W1, b1, W2, b2) or (W1, b1)."""
  if kind == "ttt_mlp":
    f = 4 * d
    return ((d, f), (1, f), (f, d), (1, d))
  return ((d, d), (1, d))


def state_bytes(kind: str, d: int, itemsize: int = 4) -> int:
  """Bytes of one head's state (f32 by default): what a kernel keeps on chip per head."""
  return sum(r * c for r, c in state_shapes(kind, d)) * itemsize


def pad_to_groups(x, groups: int, group_size: int):
  """x [B, H, N, ...] zero-padded along N to groups * group_size mini-batches, so a backward
  runs whole groups. With eta and the output cotangent padded by zeros, the padded steps leave
  the state and its cotangent unchanged."""
  N = x.shape[2]
  if num_groups(N, group_size) != groups:
    raise ValueError(f"{groups} checkpoints do not match {N} mini-batches in groups of "
                     f"{group_size}.")
  return jnp.pad(x, [(0, 0), (0, 0), (0, groups * group_size - N)] + [(0, 0)] * (x.ndim - 3))


def step_vjp(kind, gamma, beta, eps, state, XQ, XK, XV, eta, ct_state, ct_out, operands=None,
             next_state=None):
  """Recomputes one mini-batch of `kind` (matmul `operands` as in `mlp_update`) and pulls
  (ct_state, ct_out) back to its inputs, one half at a time: the output's VJP at the new
  state, then the update's with the new state's cotangent.

  `next_state`, when given, is the state after this mini-batch as a kernel already holds it
  (the state before the next one, in its stack): the output's half then starts from it, and
  the update's recomputed new state goes unused (two [d, b] x [b, f] products and their
  subtractions the compiler drops). Without it the update recomputes it.

  Returns (ct of the incoming state, ct_XQ, ct_XK, ct_XV, ct_eta, ct_gamma, ct_beta).
  """
  update_half, output_half = _HALVES[kind]

  def upd(state, XK, XV, eta, gamma, beta):
    return update_half(gamma, beta, eps, state, XK, XV, eta, operands)

  def out(state, XQ, gamma, beta):
    return output_half(gamma, beta, eps, state, XQ, operands)

  new_state, upd_vjp = jax.vjp(upd, state, XK, XV, eta, gamma, beta)
  _, out_vjp = jax.vjp(out, new_state if next_state is None else next_state, XQ, gamma, beta)
  ct_new, ct_XQ, ct_gamma, ct_beta = out_vjp(ct_out)
  ct_new = jax.tree.map(jnp.add, tuple(ct_state), tuple(ct_new))
  ct_state, ct_XK, ct_XV, ct_eta, ct_g, ct_b = upd_vjp(ct_new)
  return ct_state, ct_XQ, ct_XK, ct_XV, ct_eta, ct_gamma + ct_g, ct_beta + ct_b
