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
it instead of stepping the state again. Every function takes the mini-batch in one of two
layouts (`LAYOUTS`): a token a row as the pure op (the GPU kernels) or a feature a row (the TPU
kernels, whose LayerNorm statistics are then cheap sublane sums).
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
  HIGHEST costs the TPU forward 2.8x the bundles of its mini-batch loop on a v5p (1,888 vs 681
  a head on f32 inputs; 620.5 on bf16 operands: benchmarks/tpu_schedule.py)."""
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


# The two layouts of a mini-batch's d-wide tiles (XQ, XK, XV, the output, and the tiles the
# inner LayerNorm normalizes: TTT-MLP's Z2 and G2, TTT-Linear's Z1): "bd", a token a row (the
# pure op's), or "db", a feature a row. The LayerNorms reduce over the features: along the rows
# in "bd", which on a TPU vector register is a cross-lane reduction (8 of them a [64, 64] f32
# tile), and down the columns in "db" (adds between registers, then one sublane reduction). The
# TPU kernels run "db" (837 -> 620.5 bundles a forward mini-batch on a v5p), except at d = 128,
# where "bd" wins (`BlockSizes.tpu_layout`); the GPU kernels run "bd". In "db": gamma, beta
# [d, 1]; eta [1, b] (a row: it scales columns); TTT-MLP's W2 [d, f] (transposed) and b2 [d, 1];
# TTT-Linear's b1 [d, 1]; the [b, f] tiles (Z1, X2, G1 of TTT-MLP) and W1 as in "bd".
# `state_shapes` gives the state's shapes. gamma, beta and the bias added to the features (b2,
# TTT-Linear's b1) may also come broadcast along the tokens, [d, b], as the TPU kernels hold
# them (a [d, 1] column is broadcast across the lanes at each use): the bias's update is then
# broadcast too, and the cotangents of all three come per token (the caller sums them).
LAYOUTS = ("bd", "db")


def _feature_axis(layout: str) -> int:
  """The axis of the features in a d-wide tile of `layout`."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}: use one of {LAYOUTS}.")
  return layout.index("d")


def _token_sum(x, a, like):
  """x summed over its tokens (axis 1 - a), broadcast to `like`'s shape (a bias: one row or
  column, or broadcast along the tokens)."""
  return jnp.broadcast_to(x.sum(1 - a, keepdims=True), like.shape)


def _to_features(dot, X, W, a):
  """X [b, k] times W ([k, d] in "bd", [d, k] in "db"): [b, d] or [d, b] (a: feature axis)."""
  return dot(X, W, (1, 0)) if a == 1 else dot(W, X, (1, 1))


def mlp_update(gamma, beta, eps, state, XK, XV, eta, operands=None, layout="bd"):
  """The TTT-MLP state after one mini-batch on one (batch, head): spec 3.6 steps 1-6.

  Args:
    gamma, beta: [1, d] inner LayerNorm parameters.
    eps: LayerNorm epsilon.
    state: (W1 [d, f], b1 [1, f], W2 [f, d], b2 [1, d]).
    XK, XV: [b, d]; eta: [b, 1] (a column: it scales the rows of the gradients).
    operands: the dtype the matmul operands are rounded to (None: the state's). The TPU
      kernels pass bf16 for bf16 inputs: the reference's recipe (bf16 operands, f32
      accumulation, spec 3.10), the MXU's one pass either way, in half the vregs.
    layout: "bd" (the shapes above) or "db" (see `LAYOUTS`).

  Returns:
    The new state, in the state's dtype.
  """
  W1, b1, W2, b2 = state
  a = _feature_axis(layout)
  dot = functools.partial(_dot, operands=operands)
  Z1 = dot(XK, W1, (a, 0)) + b1  # [b, f]
  X2 = gelu_tanh(Z1)
  Z2 = _to_features(dot, X2, W2, a) + b2  # [b, d] | [d, b]
  G2 = ln_l2_grad(Z2, XV - XK, gamma, beta, eps, axis=a)  # as Z2
  G1 = dot(G2, W2, (a, a)) * gelu_tanh_grad(Z1)  # [b, f]
  eG2 = eta * G2
  if a == 1:  # eta a column: it scales G1's rows
    eG1 = eta * G1
    W1, b1 = W1 - dot(XK, eG1, (0, 0)), b1 - eG1.sum(0, keepdims=True)
    W2 = W2 - dot(X2, eG2, (0, 0))
  else:  # eta a row: it scales XK's columns, and b1's sum over the tokens is a product
    W1, b1 = W1 - dot(eta * XK, G1, (1, 0)), b1 - dot(eta, G1, (1, 0))
    W2 = W2 - dot(eG2, X2, (1, 0))
  return W1, b1, W2, b2 - _token_sum(eG2, a, b2)


def mlp_output(gamma, beta, eps, state, XQ, operands=None, layout="bd"):
  """The output (as XQ: [b, d] in "bd") of the updated inner model (spec 3.6 steps 7-8; primal
  form, see the module docstring): `state` is `mlp_update`'s result."""
  W1, b1, W2, b2 = state
  a = _feature_axis(layout)
  dot = functools.partial(_dot, operands=operands)
  X2_bar = gelu_tanh(dot(XQ, W1, (a, 0)) + b1)  # [b, f]
  return XQ + layer_norm(_to_features(dot, X2_bar, W2, a) + b2, gamma, beta, eps, axis=a)


def linear_update(gamma, beta, eps, state, XK, XV, eta, operands=None, layout="bd"):
  """The TTT-Linear state after one mini-batch: as `mlp_update` with state (W1 [d, d],
  b1 [1, d] in "bd", [d, 1] in "db")."""
  W1, b1 = state
  a = _feature_axis(layout)
  dot = functools.partial(_dot, operands=operands)
  Z1 = (dot(XK, W1, (1, 0)) if a == 1 else dot(W1, XK, (0, 0))) + b1  # [b, d] | [d, b]
  eG1 = eta * ln_l2_grad(Z1, XV - XK, gamma, beta, eps, axis=a)
  return W1 - dot(XK, eG1, (1 - a, 1 - a)), b1 - _token_sum(eG1, a, b1)


def linear_output(gamma, beta, eps, state, XQ, operands=None, layout="bd"):
  """The TTT-Linear output of the updated state, as `mlp_output`."""
  W1, b1 = state
  a = _feature_axis(layout)
  dot = functools.partial(_dot, operands=operands)
  Z1 = dot(XQ, W1, (1, 0)) if a == 1 else dot(W1, XQ, (0, 0))
  return XQ + layer_norm(Z1 + b1, gamma, beta, eps, axis=a)


# kind: (update, output), the two halves of one mini-batch.
_HALVES = {"ttt_mlp": (mlp_update, mlp_output), "ttt_linear": (linear_update, linear_output)}


def update(kind, gamma, beta, eps, state, XK, XV, eta, operands=None, layout="bd"):
  """The state after one mini-batch of `kind` (`mlp_update` or `linear_update`)."""
  return _HALVES[kind][0](gamma, beta, eps, state, XK, XV, eta, operands, layout)


def step(kind, gamma, beta, eps, state, XQ, XK, XV, eta, operands=None, layout="bd"):
  """One mini-batch of `kind` on one (batch, head): (new state, out as XQ), both in the
  state's dtype. Arguments as `mlp_update`'s, XQ as XK."""
  update_half, output_half = _HALVES[kind]
  state = update_half(gamma, beta, eps, state, XK, XV, eta, operands, layout)
  return state, output_half(gamma, beta, eps, state, XQ, operands, layout)


def state_shapes(kind: str, d: int, layout: str = "bd") -> tuple[tuple[int, int], ...]:
  """Per-head shapes of the inner model's state in `layout`: (W1, b1, W2, b2) or (W1, b1)."""
  shapes = ((d, 4 * d), (1, 4 * d), (4 * d, d), (1, d)) if kind == "ttt_mlp" else ((d, d), (1, d))
  return tuple(s[::-1] if t else s for s, t in zip(shapes, _transposed(kind, layout)))


def _transposed(kind: str, layout: str) -> tuple[bool, ...]:
  """Which of the state's arrays `layout` holds transposed (those with a d-wide axis that the
  output's features come out of: TTT-MLP's W2 and b2, TTT-Linear's b1)."""
  flip = _feature_axis(layout) == 0
  return (False, False, flip, flip) if kind == "ttt_mlp" else (False, flip)


def to_layout(kind: str, state, layout: str):
  """A state ([..., *state_shapes(kind, d)] each) from "bd" to `layout`, or back: the arrays
  `layout` holds transposed swap their last two axes (a transpose is its own inverse)."""
  return tuple(jnp.swapaxes(w, -1, -2) if t else w
               for w, t in zip(state, _transposed(kind, layout)))


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
             next_state=None, layout="bd"):
  """Recomputes one mini-batch of `kind` (matmul `operands` and `layout` as in `mlp_update`)
  and pulls (ct_state, ct_out) back to its inputs, one half at a time: the output's VJP at the
  new state, then the update's with the new state's cotangent.

  `next_state`, when given, is the state after this mini-batch as a kernel already holds it
  (the state before the next one, in its stack): the output's half then starts from it, and
  the update's recomputed new state goes unused (two [d, b] x [b, f] products and their
  subtractions the compiler drops). Without it the update recomputes it.

  Returns (ct of the incoming state, ct_XQ, ct_XK, ct_XV, ct_eta, ct_gamma, ct_beta).
  """
  update_half, output_half = _HALVES[kind]

  def upd(state, XK, XV, eta, gamma, beta):
    return update_half(gamma, beta, eps, state, XK, XV, eta, operands, layout)

  def out(state, XQ, gamma, beta):
    return output_half(gamma, beta, eps, state, XQ, operands, layout)

  new_state, upd_vjp = jax.vjp(upd, state, XK, XV, eta, gamma, beta)
  _, out_vjp = jax.vjp(out, new_state if next_state is None else next_state, XQ, gamma, beta)
  ct_new, ct_XQ, ct_gamma, ct_beta = out_vjp(ct_out)
  ct_new = jax.tree.map(jnp.add, tuple(ct_state), tuple(ct_new))
  ct_state, ct_XK, ct_XV, ct_eta, ct_g, ct_b = upd_vjp(ct_new)
  return ct_state, ct_XQ, ct_XK, ct_XV, ct_eta, ct_gamma + ct_g, ct_beta + ct_b
