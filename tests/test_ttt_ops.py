"""ttt_jax.ops.ttt_mlp / ttt_linear against the naive jax.grad form, gradients, remat, dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from oracles import naive_ttt, random_ttt_inputs, rel_err

from ttt_jax import ops

KINDS = ("ttt_mlp", "ttt_linear")
OPS = {"ttt_mlp": ops.ttt_mlp, "ttt_linear": ops.ttt_linear}
F32_TOL = 1e-5  # relative, against a float64 oracle
BF16_TOL = 1e-2

SHAPES = [  # (B, H, N, b, d)
    *[(1, 1, 1, b, d) for b in (1, 16, 64) for d in (16, 64)],
    (2, 3, 5, 16, 16),
    (1, 2, 4, 64, 64),
]


def _shape_id(s):
  return "B{}_H{}_N{}_b{}_d{}".format(*s)


def _f64(*arrays):
  return tuple(jnp.asarray(a, jnp.float64) for a in arrays)


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_naive_grad_form(kind, shape):
  xq, xk, xv, eta, lw, lb, W = random_ttt_inputs(kind, *shape)
  out = OPS[kind](xq, xk, xv, eta, lw, lb, *W, checkpoint_group=2)
  assert out.shape == xq.shape and out.dtype == jnp.float32
  with jax.enable_x64(True):
    ref, _ = naive_ttt(kind, *_f64(xq, xk, xv, eta, lw, lb), _f64(*W))
    ref = np.asarray(ref)
  # Compare the LayerNorm branch: the XQ residual would hide errors in it.
  assert rel_err(out - xq, ref - xq) <= F32_TOL
  # The test is only meaningful if the inner update changes the output a lot.
  no_update = OPS[kind](xq, xk, xv, np.zeros_like(eta), lw, lb, *W)
  assert rel_err(no_update - xq, ref - xq) > 100 * F32_TOL


@pytest.mark.parametrize("kind", KINDS)
def test_final_state_matches_naive(kind):
  xq, xk, xv, eta, lw, lb, W = random_ttt_inputs(kind, 2, 2, 3, 16, 16, seed=1)
  _, state = OPS[kind](xq, xk, xv, eta, lw, lb, *W, return_state=True)
  with jax.enable_x64(True):
    _, ref = naive_ttt(kind, *_f64(xq, xk, xv, eta, lw, lb), _f64(*W))
    ref = [np.asarray(r) for r in ref]
  for name, got, want, init in zip(state._fields, state, ref, W):
    assert got.shape == (2,) + init.shape and got.dtype == jnp.float32, name
    assert rel_err(got - init, want - init) <= F32_TOL, name


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_naive_float64(kind):
  """d/d(every input) of <op, cotangent> equals the naive form's, in float64."""
  xq, xk, xv, eta, lw, lb, W = random_ttt_inputs(kind, 2, 2, 5, 8, 16, seed=2)
  cot = np.random.default_rng(3).normal(size=xq.shape)
  with jax.enable_x64(True):
    args = _f64(xq, xk, xv, eta, lw, lb, *W)

    def op_loss(*a):
      return jnp.sum(OPS[kind](*a, checkpoint_group=2) * cot)

    def naive_loss(*a):
      return jnp.sum(naive_ttt(kind, *a[:6], a[6:])[0] * cot)

    argnums = tuple(range(len(args)))
    got = jax.grad(op_loss, argnums)(*args)
    want = jax.grad(naive_loss, argnums)(*args)
  names = ["xq", "xk", "xv", "eta", "ln_weight", "ln_bias", "W1", "b1", "W2", "b2"]
  for name, g, w in zip(names, got, want):
    assert rel_err(g, w) <= 1e-10, name


@pytest.mark.parametrize("kind", KINDS)
def test_check_grads_finite_differences(kind):
  xq, xk, xv, eta, lw, lb, W = random_ttt_inputs(kind, 1, 2, 3, 4, 16, seed=4)
  with jax.enable_x64(True):
    op = functools.partial(OPS[kind], checkpoint_group=2)  # 3 = one group + a remainder
    check_grads(op, _f64(xq, xk, xv, eta, lw, lb, *W), order=1, modes=["rev"], eps=1e-6, atol=1e-6,
                rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_remat_groups_do_not_change_results(kind):
  xq, xk, xv, eta, lw, lb, W = random_ttt_inputs(kind, 1, 2, 7, 16, 16, seed=5)
  cot = np.random.default_rng(6).normal(size=xq.shape).astype(np.float32)

  def run(group):
    def loss(*a):
      out = OPS[kind](*a, checkpoint_group=group)
      return jnp.sum(out * cot), out
    grads, out = jax.grad(loss, range(6 + len(W)), has_aux=True)(xq, xk, xv, eta, lw, lb, *W)
    return out, grads

  out0, grads0 = run(0)
  for group in (1, 3, 7, 64):  # 7 = 2 groups of 3 + 1 remainder
    out, grads = run(group)
    np.testing.assert_array_equal(out, out0)
    for g, g0 in zip(grads, grads0):  # recomputation may fuse differently: f32 rounding
      assert rel_err(g, g0) <= 1e-6


def test_remat_stores_one_state_per_group():
  """With groups of g, the backward pass keeps O(N/g + g) states, not O(N)."""
  kind, N = "ttt_mlp", 64
  xq, xk, xv, eta, lw, lb, W = random_ttt_inputs(kind, 1, 1, N, 16, 16, seed=7)

  def residual_bytes(group):
    f = lambda W1, W2: jnp.sum(ops.ttt_mlp(xq, xk, xv, eta, lw, lb, W1, W[1], W2, W[3],
                                           checkpoint_group=group))
    _, vjp_fn = jax.vjp(f, W[0], W[2])  # its pytree leaves are the saved residuals
    return sum(x.nbytes for x in jax.tree.leaves(vjp_fn))

  inputs = sum(a.nbytes for a in (xq, xk, xv, eta))
  state = sum(w.nbytes for w in W)
  no_remat, remat = residual_bytes(0), residual_bytes(8)
  assert remat <= 2 * inputs + (N // 8 + 2) * state  # inputs + one state per group
  assert no_remat > 4 * remat


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_inputs_close_to_f32(kind):
  xq, xk, xv, eta, lw, lb, W = random_ttt_inputs(kind, 2, 2, 4, 64, 64, seed=8)
  bf = lambda *a: tuple(jnp.asarray(x, jnp.bfloat16) for x in a)
  out32 = OPS[kind](xq, xk, xv, eta, lw, lb, *W)
  out16, state = OPS[kind](*bf(xq, xk, xv, eta, lw, lb, *W), return_state=True)
  assert out16.dtype == jnp.bfloat16
  assert all(s.dtype == jnp.float32 for s in state)  # f32 state even for bf16 inputs
  assert rel_err(out16, out32) <= BF16_TOL
  assert rel_err(np.asarray(out16, np.float32) - xq, out32 - xq) <= 3 * BF16_TOL


def test_jit_and_vmap_compose():
  xq, xk, xv, eta, lw, lb, W = random_ttt_inputs("ttt_mlp", 2, 2, 3, 16, 16, seed=9)
  eager = ops.ttt_mlp(xq, xk, xv, eta, lw, lb, *W)
  jitted = jax.jit(ops.ttt_mlp, static_argnames=("checkpoint_group",))(
      xq, xk, xv, eta, lw, lb, *W, checkpoint_group=2)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (dict(eta=np.zeros((1, 1, 2, 8))), "eta must be"),
    (dict(xk=np.zeros((1, 1, 2, 4, 8))), "xk has shape"),
    (dict(ln_weight=np.ones((2, 16))), "ln_weight must be"),
    (dict(W2=np.zeros((1, 16, 64))), "W2 must have shape"),
    (dict(xq=np.zeros((1, 2, 4, 16))), "xq must be"),
])
def test_bad_shapes_name_the_argument(bad, message):
  xq, xk, xv, eta, lw, lb, (W1, b1, W2, b2) = random_ttt_inputs("ttt_mlp", 1, 1, 2, 4, 16)
  args = dict(xq=xq, xk=xk, xv=xv, eta=eta, ln_weight=lw, ln_bias=lb, W1=W1, b1=b1, W2=W2,
              b2=b2)
  args.update(bad)
  with pytest.raises(ValueError, match=message):
    ops.ttt_mlp(**args)


def test_flop_count():
  # One TTT-MLP mini-batch at b = d = 64: 14*b*d*4d + 4*b^2*(d + 4d).
  assert ops.ttt_flops("ttt_mlp", 1, 1, 1, 64, 64) == 14 * 64 * 64 * 256 + 4 * 64 * 64 * 320
  assert ops.ttt_flops("ttt_linear", 2, 3, 5, 16, 64) == 30 * (6 * 16 * 64 * 64 + 4 * 256 * 64)


def test_gelu_derivatives_match_autodiff():
  """`gelu_tanh_grad` and `gelu_tanh_grad2`, and the derivatives jax takes of `gelu_tanh` and
  `gelu_tanh_grad` (their custom JVPs), against jax.grad of the plain formulas
  (`gelu_tanh_and_grad`, which has no custom rule) in float64."""
  from ttt_jax.ops.ttt import gelu_tanh, gelu_tanh_and_grad, gelu_tanh_grad, gelu_tanh_grad2
  with jax.enable_x64(True):
    x = jnp.linspace(-6.0, 6.0, 241, dtype=jnp.float64)
    grad = lambda f: jax.vmap(jax.grad(f))(x)
    want1, want2 = (grad(lambda x, i=i: gelu_tanh_and_grad(x)[i]) for i in (0, 1))
    for got, want in ((gelu_tanh_grad(x), want1), (grad(gelu_tanh), want1),
                      (gelu_tanh_grad2(x), want2), (grad(gelu_tanh_grad), want2)):
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
