"""TTT-MLP and TTT-Linear inner loops as pure functions (spec 3.6, 3.8, 3.10, 3.11).

Per (batch element, head) the hidden state is a small model f(.; W): a two-layer MLP
(W1 [d, 4d], b1, W2 [4d, d], b2) for TTT-MLP, one linear map (W1 [d, d], b1) for TTT-Linear.
For each mini-batch of b tokens, read in order:

  loss(W)  = sum_j eta_j * 1/2 || LN(f(XK_j; W)) - (XV_j - XK_j) ||^2
  W'       = W - grad loss(W)                      (one gradient step on the whole mini-batch)
  out_i    = XQ_i + LN(f(XQ_i; W'))                (non-causal: every token sees W')

and W' is carried to the next mini-batch. The gradient is written out (fused LN + L2 backward,
gelu_tanh') and the output uses the dual form (Attn = XQ XK^T, no M x M mask), so a mini-batch
is a handful of matmuls; the outer autodiff differentiates straight through these formulas.

Numerics: the state and all arithmetic run in float32 (float64 if the inputs are float64),
whatever the input dtype; the output has the dtype of `xq`. The inner LayerNorm eps defaults to
1e-6, the value of the kernels that trained the released model (spec O9).

Memory: `jax.lax.scan` over mini-batches, rematerialised every `checkpoint_group` mini-batches:
the backward pass stores one state per group plus one group's activations, O(N/g + g).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ttt_jax import sharding

_GELU_C = math.sqrt(2.0 / math.pi)


class TTTMLPState(NamedTuple):
  """TTT-MLP hidden state. Shapes [B, H, d, 4d], [B, H, 1, 4d], [B, H, 4d, d], [B, H, 1, d]."""
  W1: jax.Array
  b1: jax.Array
  W2: jax.Array
  b2: jax.Array


class TTTLinearState(NamedTuple):
  """TTT-Linear hidden state. Shapes [B, H, d, d], [B, H, 1, d]."""
  W1: jax.Array
  b1: jax.Array


# ----------------------------------------------------------------------------- inner math


def layer_norm(x, gamma, beta, eps, axis=-1):
  """LayerNorm over `axis` (the features; gamma and beta broadcast along the others), biased
  variance, eps inside the sqrt."""
  mu = x.mean(axis, keepdims=True)
  var = jnp.square(x - mu).mean(axis, keepdims=True)
  return gamma * (x - mu) * jax.lax.rsqrt(var + eps) + beta


def ln_l2_grad(z, target, gamma, beta, eps, axis=-1):
  """d/dz of 1/2 ||LN(z) - target||^2 per token (spec 3.6 step 3), the features along `axis`;
  no 1/b or 1/d scaling."""
  d = z.shape[axis]
  mu = z.mean(axis, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.square(z - mu).mean(axis, keepdims=True) + eps)
  x_hat = (z - mu) * rstd
  g = (gamma * x_hat + beta - target) * gamma  # dL/dx_hat
  return (d * g - g.sum(axis, keepdims=True)
          - x_hat * (g * x_hat).sum(axis, keepdims=True)) * (rstd / d)


def _gelu_tanh_parts(x):
  """x^2 and tanh(sqrt(2/pi) (x + 0.044715 x^3)), the argument written x (c + c k x^2): every
  gelu function below shares this form, so a kernel that wants gelu and its derivative at one
  x computes the tanh once (an XLA or LLVM common subexpression)."""
  u = x * x
  return u, jnp.tanh(x * (_GELU_C + _GELU_C * 0.044715 * u))


# gelu_tanh and gelu_tanh_grad differentiate by the closed forms below (custom JVPs sharing
# one tanh) rather than by autodiff through the tanh expression, which takes about twice the
# elementwise ops: the TPU backward kernel's reverse loop 1,534.5 -> 1,340 bundles a
# mini-batch on a v5p (benchmarks/tpu_schedule.py), the same for every backward built by
# autodiff (the pure op's, the Triton kernels').
@jax.custom_jvp
def gelu_tanh(x):
  _, t = _gelu_tanh_parts(x)
  half_x = 0.5 * x
  return half_x + half_x * t


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals, tangents):
  y, dy = gelu_tanh_and_grad(primals[0])
  return y, dy * tangents[0]


def gelu_tanh_and_grad(x):
  """`gelu_tanh` and its derivative, from one tanh."""
  u, t = _gelu_tanh_parts(x)
  half_x = 0.5 * x
  du = _GELU_C + 3 * _GELU_C * 0.044715 * u  # d/dx of tanh's argument
  return half_x + half_x * t, 0.5 + 0.5 * t + half_x * (1.0 - t * t) * du


@jax.custom_jvp
def gelu_tanh_grad(x):
  """Derivative of `gelu_tanh`."""
  return gelu_tanh_and_grad(x)[1]


@gelu_tanh_grad.defjvp
def _gelu_tanh_grad_jvp(primals, tangents):
  x, = primals
  return gelu_tanh_grad(x), gelu_tanh_grad2(x) * tangents[0]


def gelu_tanh_grad2(x):
  """Second derivative of `gelu_tanh` (`gelu_tanh_grad`'s JVP; hand-written VJPs of the TTT
  step need it too)."""
  u, t = _gelu_tanh_parts(x)
  du = _GELU_C + 3 * _GELU_C * 0.044715 * u
  return (1.0 - t * t) * (du - x * t * du * du + 3 * _GELU_C * 0.044715 * u)


def _mm(a, b):
  return jnp.einsum("bhij,bhjk->bhik", a, b)


def _mm_t(a, b):  # a @ b^T
  return jnp.einsum("bhij,bhkj->bhik", a, b)


def _tm(a, b):  # a^T @ b
  return jnp.einsum("bhji,bhjk->bhik", a, b)


def _mlp_mini_batch(gamma, beta, eps, state: TTTMLPState, inputs):
  """One TTT-MLP mini-batch (dual form). Inputs [B, H, b, d] each, eta [B, H, b]."""
  W1, b1, W2, b2 = state
  XQ, XK, XV, eta = (x.astype(W1.dtype) for x in inputs)
  eta = eta[..., None]  # [B, H, b, 1]: step size of each key token (column of E)

  Z1 = _mm(XK, W1) + b1  # [B, H, b, 4d]
  X2 = gelu_tanh(Z1)
  Z2 = _mm(X2, W2) + b2  # [B, H, b, d]
  G2 = ln_l2_grad(Z2, XV - XK, gamma, beta, eps)  # [B, H, b, d]
  G1 = _mm_t(G2, W2) * gelu_tanh_grad(Z1)  # [B, H, b, 4d]
  eG1, eG2 = eta * G1, eta * G2

  # Dual form: f(XQ; W') without forming W' first. (E o Attn) G = Attn (eta * G) as E's
  # rows are equal.
  Z1_bar = _mm(XQ, W1) - _mm(_mm_t(XQ, XK), eG1) + b1 - eG1.sum(-2, keepdims=True)
  X2_bar = gelu_tanh(Z1_bar)
  Z2_bar = _mm(X2_bar, W2) - _mm(_mm_t(X2_bar, X2), eG2) + b2 - eG2.sum(-2, keepdims=True)
  out = XQ + layer_norm(Z2_bar, gamma, beta, eps)

  new_state = TTTMLPState(W1 - _tm(XK, eG1), b1 - eG1.sum(-2, keepdims=True),
                          W2 - _tm(X2, eG2), b2 - eG2.sum(-2, keepdims=True))
  return new_state, out


def _linear_mini_batch(gamma, beta, eps, state: TTTLinearState, inputs):
  """One TTT-Linear mini-batch (dual form). Inputs [B, H, b, d] each, eta [B, H, b]."""
  W1, b1 = state
  XQ, XK, XV, eta = (x.astype(W1.dtype) for x in inputs)
  eta = eta[..., None]

  Z1 = _mm(XK, W1) + b1  # [B, H, b, d]
  eG1 = eta * ln_l2_grad(Z1, XV - XK, gamma, beta, eps)
  Z1_bar = _mm(XQ, W1) - _mm(_mm_t(XQ, XK), eG1) + b1 - eG1.sum(-2, keepdims=True)
  out = XQ + layer_norm(Z1_bar, gamma, beta, eps)
  return TTTLinearState(W1 - _tm(XK, eG1), b1 - eG1.sum(-2, keepdims=True)), out


# ----------------------------------------------------------------------------- scan + remat


def scan_remat(step, carry, xs, checkpoint_group: int | None):
  """`lax.scan(step, carry, xs)`, rematerialised every `checkpoint_group` steps.

  The scan runs over groups of `checkpoint_group` steps, each group a `jax.checkpoint`ed inner
  scan, so the backward pass keeps one carry per group and recomputes a group at a time. A
  final shorter group takes the remainder. `None` or 0 disables remat.
  """
  n = jax.tree.leaves(xs)[0].shape[0]
  if not checkpoint_group or checkpoint_group <= 0:
    return jax.lax.scan(step, carry, xs)
  g = min(checkpoint_group, n)
  num_groups, rem = divmod(n, g)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def group(c, xs_group):
    return jax.lax.scan(step, c, xs_group)

  full = jax.tree.map(lambda x: x[:num_groups * g].reshape(num_groups, g, *x.shape[1:]), xs)
  carry, ys = jax.lax.scan(group, carry, full)
  ys = jax.tree.map(lambda y: y.reshape(num_groups * g, *y.shape[2:]), ys)
  if rem:
    carry, ys_rem = group(carry, jax.tree.map(lambda x: x[num_groups * g:], xs))
    ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, ys_rem)
  return carry, ys


# ----------------------------------------------------------------------------- public ops


def check_shapes(xq, xk, xv, eta, ln_weight, ln_bias, weights):
  """Checks the shapes and dtypes of a TTT op's arguments; `weights` maps a name to (array,
  expected shape). Messages name the argument (never an XLA traceback)."""
  if xq.ndim != 5:
    raise ValueError(f"xq must be [B, H, N, b, d] (N mini-batches of b tokens), got {xq.shape}.")
  B, H, N, b, d = xq.shape
  for name, x in (("xk", xk), ("xv", xv)):
    if x.shape != xq.shape:
      raise ValueError(f"{name} has shape {x.shape}, expected xq's shape {xq.shape}.")
  if eta.shape != (B, H, N, b):
    raise ValueError(f"eta must be [B, H, N, b] = {(B, H, N, b)} (one step size per key "
                     f"token), got {eta.shape}.")
  for name, x in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
    if x.shape != (H, d):
      raise ValueError(f"{name} must be [H, d] = {(H, d)}, got {x.shape}.")
  for name, (x, want) in weights.items():
    if x.shape != want:
      raise ValueError(f"{name} must have shape {want}, got {x.shape}.")
  for name, x in (("xq", xq), ("eta", eta), ("ln_weight", ln_weight)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a floating-point array, got {x.dtype}.")


def _run(step_fn, state_cls, xq, xk, xv, eta, ln_weight, ln_bias, init, eps, checkpoint_group,
         return_state):
  B, H = xq.shape[:2]
  dtype = jnp.promote_types(xq.dtype, jnp.float32)  # f32 state; f64 stays f64
  state = state_cls(*(jnp.broadcast_to(w.astype(dtype), (B,) + w.shape) for w in init))
  gamma = ln_weight.astype(dtype)[None, :, None, :]  # [1, H, 1, d]
  beta = ln_bias.astype(dtype)[None, :, None, :]
  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (xq, xk, xv, eta))  # [N, B, H, ...]
  step = functools.partial(step_fn, gamma, beta, eps)
  state, out = scan_remat(step, state, xs, checkpoint_group)
  out = jnp.moveaxis(out, 0, 2).astype(xq.dtype)  # [B, H, N, b, d]
  return (out, state) if return_state else out


IMPLS = ("xla", "pallas", "auto")


def _use_pallas(impl: str) -> bool:
  """Resolves `impl`: "auto" takes the Pallas kernels where they compile for the target
  platform (`ttt_jax.sharding.target_platform`): Mosaic TPU and Triton GPU. "pallas" runs them
  anywhere (interpret mode on CPU)."""
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: use one of {IMPLS} (config.model.ttt.impl).")
  if impl == "xla":
    return False
  # "auto" follows the platform being compiled for (a TPU slice or GPU cluster from a CPU host
  # included), so compile-only memory plans see the kernels the run will use.
  return impl == "pallas" or sharding.target_platform() in ("tpu", "gpu")


def _pallas(kind, xq, xk, xv, eta, ln_weight, ln_bias, init, eps, checkpoint_group,
            return_state):
  """The Pallas kernel of `kind`, run per shard: XLA cannot partition a Pallas call, so heads go
  over the tensor axis and the batch over the batch axes (the layout the TTT layer constrains
  its inputs to)."""
  if return_state:
    raise ValueError("return_state=True is only available with impl='xla'.")
  from pallas_kernels.ttt import op  # here: pallas_kernels builds on this module
  kernel = functools.partial(getattr(op, kind), eps=eps, checkpoint_group=checkpoint_group)
  x, w = ("batch", "heads", None, None, None), ("heads", None, None)
  return sharding.per_shard(kernel, x, xq, xk, xv, eta, ln_weight, ln_bias, *init,
                            arg_axes=(x, x, x, x[:4], w[:2], w[:2]) + (w,) * len(init))


def ttt_mlp(xq, xk, xv, eta, ln_weight, ln_bias, W1, b1, W2, b2, *, eps: float = 1e-6,
            checkpoint_group: int | None = 16, return_state: bool = False, impl: str = "xla"):
  """TTT-MLP over a sequence of mini-batches.

  Args:
    xq, xk, xv: [B, H, N, b, d] queries, keys and values (values already hold the
      reconstruction target plus XK, i.e. the target is xv - xk).
    eta: [B, H, N, b] step size of every key token (the last row of upstream's E matrix).
    ln_weight, ln_bias: [H, d] inner LayerNorm parameters.
    W1: [H, d, 4d], b1: [H, 1, 4d], W2: [H, 4d, d], b2: [H, 1, d]: initial state, shared by
      the batch.
    eps: inner LayerNorm epsilon.
    checkpoint_group: remat every this many mini-batches (None or 0: no remat).
    return_state: also return the final per-example `TTTMLPState`.
    impl: "xla" (this scan), "pallas" (the kernels in `pallas_kernels.ttt`, interpret mode on
      CPU) or "auto" (the kernels on TPU and GPU, this scan on CPU).

  Returns:
    [B, H, N, b, d] outputs in the dtype of xq (and the final state if asked).
  """
  H, d = xq.shape[1], xq.shape[-1]
  f = W1.shape[-1]
  check_shapes(xq, xk, xv, eta, ln_weight, ln_bias,
               {"W1": (W1, (H, d, f)), "b1": (b1, (H, 1, f)), "W2": (W2, (H, f, d)),
                "b2": (b2, (H, 1, d))})
  if _use_pallas(impl):
    return _pallas("ttt_mlp", xq, xk, xv, eta, ln_weight, ln_bias, (W1, b1, W2, b2), eps,
                   checkpoint_group, return_state)
  return _run(_mlp_mini_batch, TTTMLPState, xq, xk, xv, eta, ln_weight, ln_bias,
              (W1, b1, W2, b2), eps, checkpoint_group, return_state)


def ttt_linear(xq, xk, xv, eta, ln_weight, ln_bias, W1, b1, *, eps: float = 1e-6,
               checkpoint_group: int | None = 16, return_state: bool = False, impl: str = "xla"):
  """TTT-Linear over a sequence of mini-batches; as `ttt_mlp` with W1: [H, d, d], b1: [H, 1, d]."""
  H, d = xq.shape[1], xq.shape[-1]
  check_shapes(xq, xk, xv, eta, ln_weight, ln_bias,
               {"W1": (W1, (H, d, d)), "b1": (b1, (H, 1, d))})
  if _use_pallas(impl):
    return _pallas("ttt_linear", xq, xk, xv, eta, ln_weight, ln_bias, (W1, b1), eps,
                   checkpoint_group, return_state)
  return _run(_linear_mini_batch, TTTLinearState, xq, xk, xv, eta, ln_weight, ln_bias,
              (W1, b1), eps, checkpoint_group, return_state)


def ttt_flops(kind: str, batch: int, heads: int, num_mini_batches: int, mini_batch: int,
              head_dim: int) -> int:
  """Matmul FLOPs of one forward pass of the dual form above (2 per multiply-add).

  TTT-MLP per mini-batch and head, f = 4d: seven [b, d] x [d, f]-sized products (Z1, Z2, G1,
  XQ W1, X2_bar W2, and the W1/W2 updates) plus four b x b products (two Attn matrices and
  their products with eta * G). TTT-Linear: three [b, d] x [d, d] and two b x b products.
  """
  b, d = mini_batch, head_dim
  if kind == "ttt_mlp":
    f = 4 * d
    per = 14 * b * d * f + 4 * b * b * (d + f)
  elif kind == "ttt_linear":
    per = 6 * b * d * d + 4 * b * b * d
  else:
    raise ValueError(f"kind must be 'ttt_mlp' or 'ttt_linear', got {kind!r}.")
  return batch * heads * num_mini_batches * per
