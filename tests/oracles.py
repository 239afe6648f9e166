"""Independent references for the tests: the naive TTT form via `jax.grad`, numpy helpers.

Nothing here calls `ttt_jax.ops`: the inner gradient is taken by autodiff of the written-out
loss, LayerNorm uses `jnp.var`, GELU is `jax.nn.gelu`, and the output is evaluated with the
updated weights (primal form), not the dual form the op uses.
"""

import jax
import jax.numpy as jnp
import numpy as np


def rel_err(a, b) -> float:
  """||a - b|| / ||b|| in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _ln(z, gamma, beta, eps):
  return gamma * (z - z.mean(-1, keepdims=True)) / jnp.sqrt(z.var(-1, keepdims=True) + eps) + beta


def _f(kind, W, x):
  if kind == "ttt_mlp":
    W1, b1, W2, b2 = W
    return jax.nn.gelu(x @ W1 + b1, approximate=True) @ W2 + b2
  W1, b1 = W
  return x @ W1 + b1


def naive_ttt(kind, xq, xk, xv, eta, ln_weight, ln_bias, weights, eps=1e-6):
  """Per (example, head, mini-batch): W' = W - grad_W sum_j eta_j/2 ||LN(f(XK_j; W)) - (XV_j -
  XK_j)||^2, then out_i = XQ_i + LN(f(XQ_i; W')). Returns (out [B,H,N,b,d], final weights)."""

  def one_head(xq, xk, xv, eta, gamma, beta, *W):  # [N, b, d] ..., W for this head

    def loss(W, xk, xv, eta):
      r = _ln(_f(kind, W, xk), gamma, beta, eps) - (xv - xk)  # [b, d]
      return 0.5 * jnp.sum(eta * jnp.sum(r * r, axis=-1))

    def step(W, inputs):
      q, k, v, e = inputs
      g = jax.grad(loss)(W, k, v, e)
      W = jax.tree.map(lambda w, gw: w - gw, W, g)
      return W, q + _ln(_f(kind, W, q), gamma, beta, eps)

    W, out = jax.lax.scan(step, tuple(W), (xq, xk, xv, eta))
    return out, W

  per_head = jax.vmap(one_head, in_axes=(0, 0, 0, 0, 0, 0) + (0,) * len(weights))  # heads
  per_example = jax.vmap(per_head, in_axes=(0, 0, 0, 0, None, None) + (None,) * len(weights))
  return per_example(xq, xk, xv, eta, ln_weight, ln_bias, *weights)


def random_ttt_inputs(kind, B, H, N, b, d, *, seed=0, eta_scale=1.0, dtype=np.float32):
  """Inputs with O(1) activations and step sizes large enough that the update matters."""
  rng = np.random.default_rng(seed)
  f = 4 * d if kind == "ttt_mlp" else d
  xq, xk, xv = (rng.normal(size=(B, H, N, b, d)) for _ in range(3))
  eta = rng.uniform(0.0, eta_scale / b, size=(B, H, N, b))
  ln_w = 1.0 + 0.1 * rng.normal(size=(H, d))
  ln_b = 0.1 * rng.normal(size=(H, d))
  if kind == "ttt_mlp":
    weights = (rng.normal(size=(H, d, f)) / np.sqrt(d), 0.1 * rng.normal(size=(H, 1, f)),
               rng.normal(size=(H, f, d)) / np.sqrt(f), 0.1 * rng.normal(size=(H, 1, d)))
  else:
    weights = (rng.normal(size=(H, d, d)) / np.sqrt(d), 0.1 * rng.normal(size=(H, 1, d)))
  cast = lambda x: np.asarray(x, dtype)
  return (cast(xq), cast(xk), cast(xv), cast(eta), cast(ln_w), cast(ln_b),
          tuple(map(cast, weights)))


def numpy_rope(x, head_dim, T, h, w, theta=10000.0):
  """x: [S, H, d] complex rotation of adjacent pairs; token p -> (p // hw, p % hw // w, p % w)."""
  dim_t, dim_hw = head_dim // 4, 3 * head_dim // 8
  f_t = theta ** (-2.0 * np.arange(dim_t // 2) / dim_t)
  f_hw = theta ** (-2.0 * np.arange(dim_hw // 2) / dim_hw)
  out = np.empty_like(x, dtype=np.float64)
  for p in range(x.shape[0]):
    f, r, c = p // (h * w), p % (h * w) // w, p % w
    angle = np.concatenate([f * f_t, r * f_hw, c * f_hw])  # [d/2]
    z = x[p, :, 0::2] + 1j * x[p, :, 1::2]  # adjacent pairs
    z = z * np.exp(1j * angle)
    out[p, :, 0::2], out[p, :, 1::2] = z.real, z.imag
  return out
