"""One TTT mini-batch on 2-D tiles: the math every TTT kernel runs, in one place.

`mini_batch` (TTT-MLP) and `linear_mini_batch` (TTT-Linear) are `ttt_jax.ops.ttt`'s
`_mlp_mini_batch` / `_linear_mini_batch` for one (batch element, head), built from the same
helpers (`layer_norm`, `ln_l2_grad`, `gelu_tanh`, `gelu_tanh_grad`), with 2-D matmuls that both
Triton and Mosaic TPU lower. The backward kernels differentiate them with `jax.vjp` inside the
kernel body (`step_vjp`), so there is no hand-written gradient to drift from the forward.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ttt_jax.ops.ttt import gelu_tanh, gelu_tanh_grad, layer_norm, ln_l2_grad


def num_groups(num_mini_batches: int, checkpoint_group: int) -> int:
  """How many state checkpoints the forward saves: one per group of g mini-batches."""
  return math.ceil(num_mini_batches / checkpoint_group)


def _dot(a, b, contract=(1, 0)):
  """2-D matmul contracting a's axis contract[0] with b's axis contract[1], accumulated in
  a's dtype (the state dtype, f32).

  At jax's default matmul precision, as the pure op's einsums: one bf16 pass on the TPU MXU
  and TF32 on GPU tensor cores unless `jax.default_matmul_precision` (read when the kernel is
  traced) asks for more, so kernel and pure op round at one precision on every platform.
  HIGHEST costs the TPU forward 2.9x the bundles of its mini-batch loop on a v5p (2,688 vs 939
  a head, benchmarks/tpu_schedule.py)."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                             preferred_element_type=a.dtype)


def _mm(a, b):  # a @ b
  return _dot(a, b, (1, 0))


def _mm_t(a, b):  # a @ b^T
  return _dot(a, b, (1, 1))


def _tm(a, b):  # a^T @ b
  return _dot(a, b, (0, 0))


def mini_batch(gamma, beta, eps, state, XQ, XK, XV, eta):
  """One TTT-MLP mini-batch on one (batch, head).

  Args:
    gamma, beta: [1, d] inner LayerNorm parameters.
    eps: LayerNorm epsilon.
    state: (W1 [d, f], b1 [1, f], W2 [f, d], b2 [1, d]).
    XQ, XK, XV: [b, d]; eta: [b, 1] (a column: it scales the rows of the gradients).

  Returns:
    (new state, out [b, d]), all in the state's dtype.
  """
  W1, b1, W2, b2 = state
  Z1 = _mm(XK, W1) + b1  # [b, f]
  X2 = gelu_tanh(Z1)
  Z2 = _mm(X2, W2) + b2  # [b, d]
  G2 = ln_l2_grad(Z2, XV - XK, gamma, beta, eps)  # [b, d]
  G1 = _mm_t(G2, W2) * gelu_tanh_grad(Z1)  # [b, f]
  eG1, eG2 = eta * G1, eta * G2

  # Dual form, as in the pure op: (E o Attn) G = Attn (eta * G).
  Z1_bar = _mm(XQ, W1) - _mm(_mm_t(XQ, XK), eG1) + b1 - eG1.sum(0, keepdims=True)  # [b, f]
  X2_bar = gelu_tanh(Z1_bar)
  Z2_bar = _mm(X2_bar, W2) - _mm(_mm_t(X2_bar, X2), eG2) + b2 - eG2.sum(0, keepdims=True)
  out = XQ + layer_norm(Z2_bar, gamma, beta, eps)  # [b, d]

  new_state = (W1 - _tm(XK, eG1), b1 - eG1.sum(0, keepdims=True),
               W2 - _tm(X2, eG2), b2 - eG2.sum(0, keepdims=True))
  return new_state, out


def linear_mini_batch(gamma, beta, eps, state, XQ, XK, XV, eta):
  """One TTT-Linear mini-batch on one (batch, head): as `mini_batch` with state
  (W1 [d, d], b1 [1, d])."""
  W1, b1 = state
  Z1 = _mm(XK, W1) + b1  # [b, d]
  eG1 = eta * ln_l2_grad(Z1, XV - XK, gamma, beta, eps)
  Z1_bar = _mm(XQ, W1) - _mm(_mm_t(XQ, XK), eG1) + b1 - eG1.sum(0, keepdims=True)
  out = XQ + layer_norm(Z1_bar, gamma, beta, eps)
  return (W1 - _tm(XK, eG1), b1 - eG1.sum(0, keepdims=True)), out


STEPS = {"ttt_mlp": mini_batch, "ttt_linear": linear_mini_batch}


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


def step_vjp(kind, gamma, beta, eps, state, XQ, XK, XV, eta, ct_state, ct_out):
  """Recomputes one mini-batch of `kind` and pulls (ct_state, ct_out) back to its inputs.

  Returns (ct of the incoming state, ct_XQ, ct_XK, ct_XV, ct_eta, ct_gamma, ct_beta).
  """
  step = STEPS[kind]

  def f(state, XQ, XK, XV, eta, gamma, beta):
    return step(gamma, beta, eps, state, XQ, XK, XV, eta)

  _, vjp = jax.vjp(f, state, XQ, XK, XV, eta, gamma, beta)
  return vjp((ct_state, ct_out))
