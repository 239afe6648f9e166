"""pallas_kernels.ttt (interpret mode on CPU) against the pure ops; TPU and Triton lowering.

TTT-MLP over the full shape grid, TTT-Linear (same kernels, other tile math) over a smaller one.
Both kernel families run here: "tpu" (Mosaic TPU forward and backward kernels) and "gpu"
(Triton forward and backward), in plain interpret mode over a shape x dtype grid, the TPU
kernels also under `pltpu.InterpretParams()` (Mosaic semantics: races, out-of-bounds reads) and
the Mosaic GPU cluster forward under `plgpu.InterpretGPUParams()`.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.extend import core as jex_core
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh
from tests.oracles import random_ttt_inputs, rel_err

from pallas_kernels import ttt as pk
from pallas_kernels.ttt import (gpu, gpu_cluster, gpu_cluster_backward, gpu_cluster_lib, reference,
                                tile, tpu, tpu_layout)
from ttt_jax import aot

SHAPES = {  # name: (B, H, N, b, d)
    "tiny": (1, 1, 3, 16, 16),
    "batched": (2, 2, 5, 16, 32),
    "mb32": (1, 2, 3, 32, 16),
    "wide_head": (1, 1, 2, 16, 128),
    "paper_head": (1, 2, 4, 64, 64),  # the released model's b = d = 64
}
# Relative, on out - xq (the residual would hide errors in the LayerNorm branch). Kernel (primal
# form) and pure op (dual form) are the same function, so f32 agrees to rounding; bf16 inputs
# make the TPU kernels' matmul operands bf16 too (the Triton kernels only round the output).
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
NAMES = ("xq", "xk", "xv", "eta", "ln_weight", "ln_bias", "W1", "b1", "W2", "b2")
BACKENDS = ("tpu", "gpu")


LINEAR_SHAPES = {k: SHAPES[k] for k in ("tiny", "batched", "paper_head")}


def _inputs(shape, dtype=jnp.float32, seed=0, kind="ttt_mlp"):
  xq, xk, xv, eta, lw, lb, W = random_ttt_inputs(kind, *shape, seed=seed)
  return tuple(jnp.asarray(a, dtype) for a in (xq, xk, xv, eta, lw, lb, *W))


def _check_out(got, want, xq, tol):
  xq = np.asarray(xq, np.float32)
  assert rel_err(np.asarray(got, np.float32) - xq, np.asarray(want, np.float32) - xq) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", TOL, ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward_matches_pure_op(shape, dtype, backend):
  args = _inputs(shape, dtype)
  op = functools.partial(pk.ttt_mlp, checkpoint_group=2, backend=backend)  # interpret on CPU
  got = jax.jit(op)(*args)
  want = reference.ttt_mlp(*args)
  assert got.shape == shape and got.dtype == dtype
  _check_out(got, want, args[0], TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", TOL, ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("shape", LINEAR_SHAPES.values(), ids=LINEAR_SHAPES.keys())
def test_linear_forward_matches_pure_op(shape, dtype, backend):
  args = _inputs(shape, dtype, kind="ttt_linear")
  got = jax.jit(functools.partial(pk.ttt_linear, checkpoint_group=2, backend=backend))(*args)
  assert got.shape == shape and got.dtype == dtype
  _check_out(got, reference.ttt_linear(*args), args[0], TOL[dtype])


@pytest.mark.parametrize("layout", tile.LAYOUTS)
@pytest.mark.parametrize("dtype", TOL, ids=lambda t: jnp.dtype(t).name)
def test_tpu_kernels_under_mosaic_interpret(dtype, layout):
  """InterpretParams: Mosaic's memory semantics (uninitialised scratch, races, out-of-bounds
  reads raise); two heads per grid step, N = 5 in groups of 2 (a padded last group), on either
  tile layout (`BlockSizes.tpu_layout`); as in the tuning table, the forward on "db" tiles runs
  the two heads in one mini-batch loop (`interleave_heads`), on "bd" a loop each."""
  shape = (1, 4, 5, 16, 16)
  args = _inputs(shape, dtype, seed=4)
  op = functools.partial(pk.ttt_mlp, checkpoint_group=2, backend="tpu",
                         interpret=pltpu.InterpretParams(),
                         block_sizes=pk.BlockSizes(heads_per_step=2, tpu_layout=layout,
                                                   interleave_heads=layout == "db"))
  _check_out(jax.jit(op)(*args), reference.ttt_mlp(*args), args[0], TOL[dtype])
  cot = jnp.asarray(np.random.default_rng(5).normal(size=shape), dtype)
  loss = lambda fn: lambda *a: jnp.sum((fn(*a) * cot).astype(jnp.float32))
  got = jax.jit(jax.grad(loss(op), range(10)))(*args)
  want = jax.grad(loss(reference.ttt_mlp), range(10))(*args)
  for name, g, w in zip(NAMES, got, want):
    assert g.dtype == w.dtype, name
    assert rel_err(np.asarray(g, np.float32), np.asarray(w, np.float32)) <= TOL[dtype], name


def _flip(layout):
  """A [b, d] tile to `layout` and back (a transpose in "db")."""
  return (lambda x: x.T) if layout == "db" else (lambda x: x)


def _tiles(kind, layout, b, d, seed):
  """One mini-batch of one head as `tile` takes it in `layout`, f32: (gamma, beta, state, XQ,
  XK, XV, eta), and the [1, 1, 1, ...] arrays the pure op takes."""
  xq, xk, xv, eta, lw, lb, W = random_ttt_inputs(kind, 1, 1, 1, b, d, seed=seed)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  T = _flip(layout)
  state = tile.to_layout(kind, tuple(f32(w[0]) for w in W), layout)
  XQ, XK, XV = (T(f32(x[0, 0, 0])) for x in (xq, xk, xv))
  eta_col = f32(eta[0, 0, 0])[:, None]  # [b, 1]; "db" takes it as a row
  return (T(f32(lw[:1])), T(f32(lb[:1])), state, XQ, XK, XV, T(eta_col)), (xq, xk, xv, eta,
                                                                            lw, lb, *W)


@pytest.mark.parametrize("layout", tile.LAYOUTS)
@pytest.mark.parametrize("kind", ("ttt_mlp", "ttt_linear"))
def test_step_matches_pure_op_in_each_layout(kind, layout):
  """`tile.step` (primal form) in each layout against the pure op (dual form) over one
  mini-batch: output and new state, f32."""
  (gamma, beta, state, XQ, XK, XV, eta), args = _tiles(kind, layout, 16, 32, seed=2)
  new_state, out = tile.step(kind, gamma, beta, 1e-6, state, XQ, XK, XV, eta, layout=layout)
  want_out, want_state = getattr(reference, kind)(*args, return_state=True)
  assert rel_err(np.asarray(_flip(layout)(out)), np.asarray(want_out[0, 0, 0])) <= TOL[jnp.float32]
  for name, w, ref in zip(NAMES[6:], tile.to_layout(kind, new_state, layout), want_state):
    assert w.shape == ref.shape[2:] and rel_err(np.asarray(w), np.asarray(ref[0, 0])) <= 1e-5, name


@pytest.mark.parametrize("layout", tile.LAYOUTS)
@pytest.mark.parametrize("kind", ("ttt_mlp", "ttt_linear"))
def test_step_vjp_matches_autodiff_of_the_step(kind, layout):
  """`tile.step_vjp` (the two halves' VJPs, as the backward kernels run it) against jax.vjp of
  the whole `tile.step`, with the next state recomputed and with it given as a kernel's stack
  holds it; f32 tiles."""
  (gamma, beta, state, XQ, XK, XV, eta), _ = _tiles(kind, layout, 16, 32, seed=3)
  rng = np.random.default_rng(4)
  ct_state = tuple(jnp.asarray(rng.normal(size=w.shape), jnp.float32) for w in state)
  ct_out = jnp.asarray(rng.normal(size=XQ.shape), jnp.float32)

  f = lambda state, XQ, XK, XV, eta, gamma, beta: tile.step(kind, gamma, beta, 1e-6, state, XQ,
                                                            XK, XV, eta, layout=layout)
  next_state, vjp = jax.vjp(f, state, XQ, XK, XV, eta, gamma, beta)
  want = jax.tree.leaves(vjp((ct_state, ct_out)))
  for given in (None, next_state[0]):
    got = jax.tree.leaves(tile.step_vjp(kind, gamma, beta, 1e-6, state, XQ, XK, XV, eta,
                                        ct_state, ct_out, next_state=given, layout=layout))
    assert len(got) == len(want)
    for g, w in zip(got, want):
      assert g.shape == w.shape and rel_err(np.asarray(g), np.asarray(w)) <= 1e-5


def test_tile_layout_is_checked():
  with pytest.raises(ValueError, match="layout='dd'"):
    tile.state_shapes("ttt_mlp", 16, "dd")


def test_tpu_mini_batches_per_step():
  """k mini-batches per forward grid step: k divides g and 8 divides k or k divides 8."""
  assert [tpu.mini_batches_per_step(k, 16) for k in (1, 3, 8, 12, 16, 64)] == [1, 2, 8, 8, 16, 16]
  assert tpu.mini_batches_per_step(8, 6) == 2 and tpu.mini_batches_per_step(8, 3) == 1
  assert tpu.mini_batches_per_step(24, 48) == 24 and tpu.mini_batches_per_step(0, 16) == 1


@pytest.mark.parametrize("k", (1, 4, 16))
def test_tpu_forward_steps_over_several_mini_batches(k):
  """N = 19 in steps of k (the last block runs past the sequence; k = 16 takes eta in blocks
  of 16 rows): output as the pure op, checkpoints (g = 16) as at one mini-batch per step
  (to f32 rounding: XLA orders the interpreted loop's arithmetic differently)."""
  args = _inputs((1, 2, 19, 16, 16), seed=6)
  kw = dict(kind="ttt_mlp", eps=1e-6, checkpoint_group=16, heads_per_step=2, interpret=True)
  out, ckpts = tpu.forward(*args[:6], args[6:], block_sizes=pk.BlockSizes(
      mini_batches_per_step=k), **kw)
  _check_out(out, reference.ttt_mlp(*args), args[0], TOL[jnp.float32])
  _, want = tpu.forward(*args[:6], args[6:], block_sizes=pk.BlockSizes(mini_batches_per_step=1),
                        **kw)
  for name, c, w in zip(NAMES[6:], ckpts, want):
    assert c.shape == w.shape and rel_err(c, w) <= TOL[jnp.float32], name  # f32 rounding


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoints_are_group_start_states(backend):
  """The forward saves the state before mini-batches 0, g, 2g, ...: N = 3, g = 2 gives 2."""
  args = _inputs((2, 2, 3, 16, 16), seed=1)
  kw = dict(kind="ttt_mlp", eps=1e-6, checkpoint_group=2, interpret=True)
  if backend == "tpu":  # in the kernels' layout: back to the pure op's
    _, ckpts = tpu.forward(*args[:6], args[6:], heads_per_step=2, **kw)
    ckpts = tpu_layout.checkpoint_states("ttt_mlp", ckpts)
  else:
    _, ckpts = gpu.forward(*args[:6], args[6:], **kw)
  _check_group_start_states(ckpts, args, groups=2, tol=1e-6)


@pytest.mark.parametrize("kind", ("ttt_mlp", "ttt_linear"))
def test_tpu_token_row_tiles_match_pure_op(kind):
  """The TPU kernels on [b, d] tiles (`tpu_layout="bd"`, the tuning table's pick at d = 128):
  output, gradients and TTT-MLP's checkpoints against the pure op (f32; N = 5 in groups of 2,
  two heads a grid step)."""
  shape = SHAPES["batched"]
  args = _inputs(shape, seed=10, kind=kind)
  sizes = pk.BlockSizes(heads_per_step=2, tpu_layout="bd")
  op = functools.partial(getattr(pk, kind), checkpoint_group=2, backend="tpu", block_sizes=sizes)
  ref = getattr(reference, kind)
  _check_out(jax.jit(op)(*args), ref(*args), args[0], TOL[jnp.float32])
  cot = jnp.asarray(np.random.default_rng(11).normal(size=shape), jnp.float32)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * cot)
  got = jax.jit(jax.grad(loss(op), range(len(args))))(*args)
  want = jax.grad(loss(ref), range(len(args)))(*args)
  for name, g, w in zip(NAMES, got, want):
    assert g.shape == w.shape and rel_err(g, w) <= 1e-5, name
  if kind == "ttt_mlp":
    _, ckpts = tpu.forward(*args[:6], args[6:], kind=kind, eps=1e-6, checkpoint_group=2,
                           heads_per_step=2, interpret=True, block_sizes=sizes)
    _check_group_start_states(tpu_layout.checkpoint_states(kind, ckpts, "bd"), args, groups=3,
                              tol=1e-6)


def _check_group_start_states(ckpts, args, groups, tol):
  """Checkpoints [B, H, groups, ...] at g = 2: group 0 starts at the initial weights (exactly),
  group 1 at the pure op's state after mini-batches 0 and 1 (within tol)."""
  xq, xk, xv, eta, lw, lb, *W = args
  B, H = xq.shape[:2]
  _, after_2 = reference.ttt_mlp(xq[:, :, :2], xk[:, :, :2], xv[:, :, :2], eta[:, :, :2], lw, lb,
                                 *W, return_state=True)
  for name, c, w0, w2 in zip(NAMES[6:], ckpts, W, after_2):
    assert c.shape == (B, H, groups) + w0.shape[1:], name
    np.testing.assert_array_equal(c[:, :, 0], jnp.broadcast_to(w0, (B,) + w0.shape), name)
    assert rel_err(c[:, :, 1], w2) <= tol, name


# N = 5, g = 2: two full groups and a remainder (padded in the backward); g = 4: a group and a
# remainder padded by 3 (G = 2 groups, so g != ceil(N / G)); g = None: one group.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,group", [(SHAPES["batched"], 2), (SHAPES["batched"], 4),
                                         (SHAPES["paper_head"], None), (SHAPES["mb32"], 1)],
                         ids=["batched-g2", "batched-g4", "paper_head-one_group", "mb32-g1"])
def test_gradients_match_pure_op(shape, group, backend):
  args = _inputs(shape, seed=2)
  cot = jnp.asarray(np.random.default_rng(3).normal(size=shape), jnp.float32)

  def grads(op, **kw):
    loss = lambda *a: jnp.sum(op(*a, **kw) * cot)
    return jax.jit(jax.grad(loss, range(len(args))))(*args)

  got = grads(pk.ttt_mlp, checkpoint_group=group, backend=backend)
  want = grads(reference.ttt_mlp, checkpoint_group=None)  # remat does not change the math
  for name, g, w in zip(NAMES, got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    # Same formulas, but the backward recomputes groups and sums the batch and the group
    # contributions in another order than the pure op's scan: f32 rounding only (measured
    # <= 5e-7).
    assert rel_err(g, w) <= 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", [4, None], ids=["g4", "one_group"])
def test_linear_gradients_match_pure_op(group, backend):
  shape = SHAPES["batched"]
  args = _inputs(shape, seed=8, kind="ttt_linear")
  cot = jnp.asarray(np.random.default_rng(9).normal(size=shape), jnp.float32)

  def grads(op, **kw):
    loss = lambda *a: jnp.sum(op(*a, **kw) * cot)
    return jax.jit(jax.grad(loss, range(len(args))))(*args)

  got = grads(pk.ttt_linear, checkpoint_group=group, backend=backend)
  want = grads(reference.ttt_linear, checkpoint_group=None)
  for name, g, w in zip(NAMES, got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    assert rel_err(g, w) <= 1e-5, name


def test_bad_shapes_raise():
  args = list(_inputs(SHAPES["tiny"]))
  args[3] = args[3][..., :-1]  # eta one token short
  with pytest.raises(ValueError, match="eta must be"):
    pk.ttt_mlp(*args)
  args = _inputs(SHAPES["tiny"])
  with pytest.raises(ValueError, match="backend='cuda'"):
    pk.ttt_mlp(*args, backend="cuda")
  with pytest.raises(ValueError, match="do not compile for 'cpu'"):
    pk.ttt_mlp(*args, backend="tpu", interpret=False)
  with pytest.raises(ValueError, match="takes True or False"):
    pk.ttt_mlp(*args, backend="gpu", interpret=pltpu.InterpretParams())
  lin = _inputs(SHAPES["tiny"], kind="ttt_linear")
  with pytest.raises(ValueError, match=r"W1 must have shape \(1, 16, 16\)"):
    pk.ttt_linear(*lin[:6], args[6], lin[7])  # a TTT-MLP W1


def test_gpu_backward_kernel_choice():
  """The Triton backward kernel where the state fits one SM (measured for an H100), else the
  XLA reverse sweep; the gradient tests above run both (d = 32 kernel, d = 64 XLA)."""
  assert not gpu.backward_fits_kernel("ttt_mlp", 64)
  assert gpu.backward_fits_kernel("ttt_mlp", 32) and gpu.backward_fits_kernel("ttt_linear", 64)


# The Mosaic GPU cluster forward (TTT-MLP, bf16, b = 64): hidden width split over P CTAs.
CLUSTER_CASES = {  # name: ((B, H, N, b, d), P, warpgroups a CTA)
    "d64-P4": ((1, 2, 5, 64, 64), 4, 1),
    "d64-P4-batched": ((2, 1, 3, 64, 64), 4, 1),
    "d64-P8": ((1, 2, 3, 64, 64), 8, 1),  # 8 rows a CTA, W2^T's slice held
    "d64-P4-wg2": ((1, 2, 5, 64, 64), 4, 2),  # 8 slices of 32 on 4 CTAs, as P = 8's
}


@pytest.mark.parametrize("shape,P,W", CLUSTER_CASES.values(), ids=CLUSTER_CASES.keys())
def test_cluster_forward_matches_pure_op(shape, P, W):
  """Output and checkpoints of the cluster kernel (GPU interpreter; the peers' partial sums
  through global memory) against the pure op in f32 on the same bf16 inputs. The kernel's
  matmuls take bf16 operands (the state is f32), hence bf16 tolerances: measured 4e-3 to 8e-3
  on the output, 2e-3 on the state. With two warpgroups a CTA the interpreter's race detector
  checks their shared input buffers and barriers (it raises on a race: reading XQ's rows for
  the output after the mini-batch's first cluster barrier, where the sibling's prefetch may
  overwrite them, is one)."""
  args = _inputs(shape, jnp.bfloat16, seed=4)
  sizes = pk.BlockSizes(cluster=P, warpgroups=W)
  op = functools.partial(pk.ttt_mlp, checkpoint_group=2, backend="gpu", block_sizes=sizes)
  got = jax.jit(op)(*args)
  want = reference.ttt_mlp(*args)
  assert got.shape == shape and got.dtype == jnp.bfloat16
  _check_out(got, want, args[0], 2e-2)

  _, ckpts = gpu_cluster.forward(*args[:6], tuple(w.astype(jnp.float32) for w in args[6:]),
                                 eps=1e-6, checkpoint_group=2, cluster=P, warpgroups=W,
                                 interpret=plgpu.InterpretGPUParams(detect_races=True))
  _check_group_start_states(ckpts, args, groups=(shape[2] + 1) // 2, tol=1e-2)


@pytest.mark.parametrize("group,P,W", [(2, 4, 1), (1, 4, 1), (2, 8, 1), (1, 8, 1), (2, 4, 2)],
                         ids=["g2-recompute", "g1-stored_states", "g2-P8", "g1-P8", "g2-wg2"])
def test_cluster_op_gradients(group, P, W):
  """The op on the cluster kernels against the pure op's gradients within bf16 tolerance
  (measured 3e-3 to 6e-3). g = 2: `gpu.backward` recomputes each group with the cluster forward
  and sweeps it in reverse with the cluster backward (N = 3: a padded group). g = 1: the
  forward saves every state in bf16 and one backward call sweeps them, with no recompute (the
  forward kernel appears once in the jaxpr); the forward alone writes one checkpoint. On 8
  CTAs a head the kernels hold W2^T's slices (the stored states too). With two warpgroups a
  CTA the forward runs on them and the backward's recompute on one (its stack of states is
  laid out for the backward's split)."""
  B, H, N, b, d = shape = (1, 2, 3, 64, 64)
  args = _inputs(shape, jnp.bfloat16, seed=5)
  cot = jnp.asarray(np.random.default_rng(6).normal(size=shape), jnp.float32)
  sizes = pk.BlockSizes(cluster=P, warpgroups=W)
  kw = dict(checkpoint_group=group, backend="gpu", block_sizes=sizes)

  def grads(op, **kw):
    loss = lambda *a: jnp.sum(op(*a, **kw).astype(jnp.float32) * cot)
    return jax.grad(loss, range(len(args)))

  got = jax.jit(grads(pk.ttt_mlp, **kw))(*args)
  want = jax.jit(grads(reference.ttt_mlp, checkpoint_group=None))(*args)
  for name, g, w in zip(NAMES, got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    assert rel_err(g, w) <= 2e-2, name

  jaxpr = str(jax.make_jaxpr(grads(pk.ttt_mlp, **kw))(*args))
  assert jaxpr.count("ttt_mlp_forward_cluster") == (1 if group == 1 else 2)
  assert jaxpr.count("ttt_mlp_backward_cluster") == 1
  assert (f"bf16[{B},{H},{N + 1},{d},{4 * d}]" in jaxpr) == (group == 1)  # the stored W1s
  assert jaxpr.count(f"cluster=({P},)") == (2 if group == 1 else 3)  # every kernel on P
  assert jaxpr.count("num_threads=2") == (W == 2)  # the forward only
  primal = str(jax.make_jaxpr(functools.partial(pk.ttt_mlp, **kw))(*args))
  assert f"f32[{B},{H},1,{d},{4 * d}]" in primal  # W1's one checkpoint


@pytest.mark.parametrize("P", [4, 8], ids=["P4", "P8"])
def test_cluster_backward_group_matches_autodiff(P):
  """One group's reverse sweep on the cluster split (hand-written VJP, GPU interpreter) against
  the XLA sweep of `tile.step_vjp` (jax.vjp of the tile math, f32) from the same checkpoint and
  cotangents; the kernel runs on the bf16 operand copies of the recomputed states (on 8 CTAs a
  head, W2's as W2^T). Measured 2e-3 to 6e-3 (relative norm) on every cotangent. The recompute
  without the output (as `gpu.backward` runs it) gives exactly the states the forward with its
  output saves."""
  B, H, g, b, d = 2, 2, 2, 64, 64  # two batch elements: per-example states and outputs
  rng = np.random.default_rng(7)
  r = lambda *s, sc=1.0: jnp.asarray(rng.normal(size=s) * sc, jnp.float32)
  xq, xk, xv = (r(B, H, g, b, d).astype(jnp.bfloat16) for _ in range(3))
  eta = jnp.abs(r(B, H, g, b, sc=0.02))
  lw, lb = 1 + r(H, d, sc=0.1), r(H, d, sc=0.1)
  f = 4 * d
  ckpt = (r(B, H, d, f, sc=0.05), r(B, H, 1, f, sc=0.02), r(B, H, f, d, sc=0.05),
          r(B, H, 1, d, sc=0.02))
  ct_out = r(B, H, g, b, d).astype(jnp.bfloat16)
  ct_final = tuple(r(*c.shape, sc=0.1) for c in ckpt)
  # detect_races: the interpreter checks the kernels' barriers and proxy fences (its model
  # covers one CTA's threads and TMA; the exchange goes through global memory there).
  mosaic = dict(eps=1e-6, cluster=P, interpret=plgpu.InterpretGPUParams(detect_races=True))
  recompute = functools.partial(gpu_cluster.forward, xq, xk, xv, eta, lw, lb, ckpt,
                                checkpoint_group=1, per_example_init=True,
                                weights_dtype=jnp.bfloat16, **mosaic)
  none, states = recompute(output=False)  # g + 1: the states before each and after the last
  assert none is None and states[0].dtype == jnp.bfloat16 and states[1].dtype == jnp.float32
  assert all(w.shape[2] == g + 1 for w in states)
  out, with_output = recompute()
  assert out.shape == xq.shape
  for x, y in zip(states, with_output):
    np.testing.assert_array_equal(x, y)
  got = gpu_cluster_backward.backward_group((xq, xk, xv, eta), lw, lb, states, ct_out, ct_final,
                                            **mosaic)
  f32 = lambda x: x.astype(jnp.float32)
  _, states32 = gpu.forward(f32(xq), f32(xk), f32(xv), eta, lw, lb, ckpt, kind="ttt_mlp",
                            eps=1e-6, checkpoint_group=1, interpret=True, per_example_init=True)
  want = gpu._backward_group_xla("ttt_mlp", 1e-6, (xq, xk, xv, eta[..., None]), lw[:, None],
                                 lb[:, None], states32, ct_out, ct_final)
  want = (*want[:3], want[3][..., 0], want[4][:, :, 0], want[5][:, :, 0], want[6:])
  names = ("xq", "xk", "xv", "eta", "ln_weight", "ln_bias", "state")
  for name, a, w in zip(names, got, want):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(w)):
      assert x.shape == y.shape, name
      assert rel_err(x, y) <= 2e-2, name


def test_cluster_supports():
  assert gpu_cluster.supports("ttt_mlp", jnp.bfloat16, 64, 64, 4)
  assert not gpu_cluster.supports("ttt_mlp", jnp.float32, 64, 64, 4)  # wgmma operands: bf16
  assert not gpu_cluster.supports("ttt_mlp", jnp.bfloat16, 16, 64, 4)  # a wgmma tile: 64 rows
  assert gpu_cluster.supports("ttt_mlp", jnp.bfloat16, 64, 64, 8)  # 32 hidden units, W2^T held
  assert gpu_cluster.w2_transposed(64, 8) and not gpu_cluster.w2_transposed(64, 4)
  assert gpu_cluster.smem_bytes(64, 64, 8) < gpu_cluster.smem_bytes(64, 64, 4)
  assert gpu_cluster_backward.supports("ttt_mlp", jnp.bfloat16, 64, 64, 8)
  assert gpu_cluster_backward.smem_bytes(64, 64, 8) < 212 << 10  # as at 4, own tiles instead
  assert not gpu_cluster.supports("ttt_linear", jnp.bfloat16, 64, 64, 1)
  # Shared memory: the estimate came within 1.3% of Mosaic GPU's count when compiling d = 128,
  # P = 8 for an H100 (an earlier scratch list: 329,728 B estimated, 333,856 B asked for).
  assert gpu_cluster.smem_bytes(64, 64, 4) <= gpu_cluster_lib.SMEM_LIMIT_BYTES
  # The backward: 20 bf16 tiles and 3 f32 ones (212 KiB; Mosaic GPU asked for 225 KiB).
  assert gpu_cluster_backward.supports("ttt_mlp", jnp.bfloat16, 64, 64, 4)
  assert 200 << 10 < gpu_cluster_backward.smem_bytes(64, 64, 4) < 215 << 10
  assert not gpu_cluster_backward.supports("ttt_mlp", jnp.bfloat16, 64, 128, 8)
  assert not gpu_cluster.supports("ttt_mlp", jnp.bfloat16, 64, 64, 2)
  # Two warpgroups a CTA: 8 slices on 4 CTAs; on 8 the slices would be 16 wide.
  assert gpu_cluster.supports("ttt_mlp", jnp.bfloat16, 64, 64, 4, warpgroups=2)
  assert not gpu_cluster.supports("ttt_mlp", jnp.bfloat16, 64, 64, 8, warpgroups=2)
  assert (gpu_cluster.smem_bytes(64, 64, 4, warpgroups=2) + gpu_cluster_lib.MOSAIC_RESERVE_BYTES
          <= gpu_cluster_lib.SMEM_LIMIT_BYTES)
  assert not gpu_cluster.supports("ttt_mlp", jnp.bfloat16, 64, 128, 8)
  with pytest.raises(ValueError, match="cluster=2, warpgroups=1 is not supported"):
    gpu_cluster.forward(*_inputs((1, 1, 1, 64, 64), jnp.bfloat16)[:6], (), eps=1e-6,
                        checkpoint_group=1, cluster=2)
  # The backward's stack of states: g + 1 of them, as the forward saves them at g = 1 only.
  args = _inputs((1, 1, 2, 64, 64), jnp.bfloat16)
  B, H, g, b, d = args[0].shape
  stack = lambda n: tuple(jnp.zeros((B, H, n, *w.shape[1:]), t)
                          for w, t in zip(args[6:], (jnp.bfloat16, jnp.float32) * 2))
  final = tuple(jnp.zeros((B, H, *w.shape[1:])) for w in args[6:])
  with pytest.raises(ValueError, match="pass g \\+ 1 = 3"):
    gpu_cluster_backward.backward_group(args[:4], *args[4:6], stack(g), args[0], final, eps=1e-6)
  with pytest.raises(ValueError, match="needs checkpoint_group=1"):
    gpu_cluster.forward(*args[:6], args[6:], eps=1e-6, checkpoint_group=2,
                        weights_dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="use warpgroups=1"):  # the stack is the backward's
    gpu_cluster.forward(*args[:6], args[6:], eps=1e-6, checkpoint_group=1, warpgroups=2,
                        weights_dtype=jnp.bfloat16)
  # The forward's row split: 16 rows per CTA at cluster = 4, 8 at 8.
  assert gpu_cluster_lib.row_block(3, 64, 64, 4).ds.size == 16
  assert gpu_cluster_lib.row_block(7, 64, 64, 8).ds.size == 8
  with pytest.raises(ValueError, match="needs d = 64 and b / cluster in \\[8, 16\\]"):
    gpu_cluster_lib.row_block(0, 64, 32, 4)


def test_cluster_size_choice():
  """The cluster kernels' split (`gpu.cluster_size`, forward and backward alike): the table's
  wave_cluster where B x H x 8 CTAs fit one wave of the H100's 132 SMs (128 in clusters of
  8), else 4; 0 (Triton) where no cluster kernel takes the shape."""
  h100 = pk.get_block_sizes("NVIDIA H100 80GB HBM3", jnp.bfloat16, 64)
  choose = lambda B, H, d=64, sizes=h100: gpu.cluster_size(
      "ttt_mlp", jnp.bfloat16, (B, H, 100, 64, d), sizes)
  assert (h100.cluster, h100.wave_cluster, h100.sms) == (4, 8, 132)
  assert choose(1, 12) == 8 and choose(1, 16) == 8 and choose(2, 8) == 8
  assert choose(1, 17) == 4 and choose(1, 48) == 4  # 48: two waves at 4, three at 8
  assert choose(1, 12, d=32) == 0
  pcie = pk.get_block_sizes("NVIDIA H100 PCIe", jnp.bfloat16, 64)
  assert pcie.sms == 114 and choose(1, 14, sizes=pcie) == 8 and choose(1, 15, sizes=pcie) == 4
  assert choose(1, 48, sizes=pk.BlockSizes(cluster=4, wave_cluster=8)) == 8  # sms=0: always
  assert gpu.stores_states("ttt_mlp", jnp.bfloat16, (1, 12, 100, 64, 64), 1, h100)
  assert not gpu.stores_states("ttt_mlp", jnp.bfloat16, (1, 12, 100, 64, 64), 16, h100)


def test_block_sizes_table():
  assert pk.get_block_sizes("NVIDIA H100 80GB HBM3", jnp.bfloat16, 64).cluster == 4
  assert pk.get_block_sizes("NVIDIA H100 80GB HBM3", jnp.float32, 64) == pk.BlockSizes(
      num_warps=8, num_stages=1)
  # a v5p's two TensorCores: 12 heads in 4 steps of 3 (2 a core); 2 a step at d = 128
  assert [pk.get_block_sizes("TPU v5", jnp.bfloat16, d).heads_per_step for d in (64, 128)] == [
      3, 2]
  for one_core in ("TPU v5 lite", "TPU v5e", "TPU v6 lite"):  # one TensorCore a chip
    assert [pk.get_block_sizes(one_core, jnp.bfloat16, d).heads_per_step for d in (64, 128)] == [
        4, 4]
  assert pk.get_block_sizes("TPU v5 lite", jnp.bfloat16, 16).mini_batches_per_step == 16
  assert pk.get_block_sizes("TPU v6 lite", jnp.float32, 128).tpu_layout == "bd"
  assert pk.get_block_sizes("TPU v5", jnp.bfloat16, 64).tpu_layout == "db"
  assert pk.get_block_sizes("TPU v5", jnp.bfloat16, 64).interleave_heads
  assert not pk.get_block_sizes("TPU v6 lite", jnp.bfloat16, 128).interleave_heads
  assert pk.get_block_sizes("cpu", jnp.float32, 64) == pk.BlockSizes()
  # The backward's VMEM (state stack, double-buffered blocks) fits the table's TPU limit.
  for kind in ("TPU v5", "TPU v6 lite"):
    sizes = pk.get_block_sizes(kind, jnp.float32, 64)
    assert tpu_layout.vmem_estimate(sizes.heads_per_step, 16, 64, 64) < sizes.vmem_limit_bytes


def test_tpu_backward_vmem_limit_fits_or_names_the_fix():
  """`tpu_layout.fit_vmem` leaves shapes within Mosaic's default scoped VMEM alone, raises the
  limit for those past it (d = 128 at g = 16, which libtpu refuses at the default) up to the
  chip's VMEM, and where even that cannot hold the backward names the largest checkpoint_group
  that fits (or one head a step)."""
  fit = lambda sizes, device_kind, g=16, hb=1, d=128, in_bytes=2: tpu_layout.fit_vmem(
      sizes, device_kind, kind="ttt_mlp", heads_per_step=hb, g=g, b=64, d=d, in_bytes=in_bytes)
  default = pk.BlockSizes()
  table = pk.get_block_sizes("TPU v5", jnp.bfloat16, 64)
  assert fit(table, "TPU v5", hb=2, d=64) == table
  assert fit(default, "TPU v5", d=64) == default
  need = tpu_layout.vmem_estimate(1, 16, 64, 128, 2)
  raised = fit(default, "TPU v5").vmem_limit_bytes
  assert need > 16 << 20 and 1.2 * need < raised <= pk.vmem_capacity("TPU v5") == 64 << 20
  assert fit(pk.BlockSizes(vmem_limit_bytes=48 << 20), "TPU v5").vmem_limit_bytes == 48 << 20
  assert fit(default, "cpu").vmem_limit_bytes == raised  # interpret mode: no capacity known
  # A v4 TensorCore has 16 MiB: the message's checkpoint_group fits, one more does not.
  with pytest.raises(ValueError, match=r"model\.ttt\.checkpoint_group") as e:
    fit(default, "TPU v4")
  g = int(re.search(r"checkpoint_group to (\d+)", str(e.value)).group(1))
  assert (fit(default, "TPU v4", g=g).vmem_limit_bytes or 0) <= 16 << 20  # no error
  with pytest.raises(ValueError):
    fit(default, "TPU v4", g=g + 1)
  with pytest.raises(ValueError, match=r"heads_per_step=1"):
    fit(default, "TPU v5", g=32, hb=4)
  # Through the op, before anything reaches XLA.
  v4 = AbstractDevice(device_kind="TPU v4", num_cores=1, platform="tpu")
  with pytest.raises(ValueError, match=r"more than the TPU v4's 16 MiB"):
    _lower(v4, "tpu", jnp.bfloat16, shape_kw=dict(N=32, d=128), checkpoint_group=16)


def _abstract_shapes(dtype, B=1, H=2, N=5, b=64, d=64, kind="ttt_mlp"):
  from pallas_kernels.ttt.tile import state_shapes
  S = jax.ShapeDtypeStruct
  shapes = [S((B, H, N, b, d), dtype)] * 3 + [S((B, H, N, b), dtype)] + [S((H, d), dtype)] * 2
  return shapes + [S((H, *s), dtype) for s in state_shapes(kind, d)]


def _lower(device, platform, dtype, kind="ttt_mlp", shape_kw=(), **op_kw):
  """Lowered text of the forward and of the gradient for an abstract `device`."""
  mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)
  op_kw.setdefault("checkpoint_group", 2)
  op = functools.partial(getattr(pk, kind), **op_kw)  # interpret: False
  loss = lambda *a: jnp.sum(op(*a).astype(jnp.float32))
  shapes = _abstract_shapes(dtype, kind=kind, **dict(shape_kw))
  with use_abstract_mesh(mesh):
    return [jax.jit(f).trace(*shapes).lower(lowering_platforms=(platform,)).as_text()
            for f in (op, jax.grad(loss, range(len(shapes))))]


LOWERINGS = [("ttt_mlp", jnp.float32), ("ttt_mlp", jnp.bfloat16), ("ttt_linear", jnp.bfloat16)]
LOWERING_IDS = ["ttt_mlp-float32", "ttt_mlp-bfloat16", "ttt_linear-bfloat16"]


@pytest.mark.parametrize("kind,dtype", LOWERINGS, ids=LOWERING_IDS)
def test_lowers_to_triton_for_abstract_h100(kind, dtype):
  """Forward and backward lower for CUDA on a CPU-only host; the kernel is a Triton call."""
  h100 = AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
  # cluster=0: the Triton forward (the table picks the Mosaic GPU one for bf16 TTT-MLP, which
  # lowers only with jax's CUDA plugin: test_cluster_kernel_compiles_for_h100).
  fwd, grad = _lower(h100, "cuda", dtype, kind, block_sizes=pk.BlockSizes(num_warps=8))
  for text in (fwd, grad):
    assert "__gpu$xla.gpu.triton" in text
    assert "num_warps = 8 : i32" in text
  assert f"{kind}_forward_triton" in fwd and f"{kind}_forward_triton" in grad  # + recompute
  # TTT-MLP's d = 64 backward does not fit one SM's shared memory: its reverse sweep is XLA.
  assert (f"{kind}_backward_triton" in grad) == gpu.backward_fits_kernel(kind, 64)


def _cuda_plugin():
  try:
    return aot.get_topology("h100-1").devices
  except aot.TopologyError as e:
    pytest.skip(f"needs jax's CUDA plugin (not installed by .[test]): {e}")


@pytest.mark.parametrize("kind,d", [("ttt_linear", 64), ("ttt_mlp", 32)])
def test_triton_backward_compiles_for_h100(kind, d):
  """The Triton backward kernel (its reverse loop with the group's last mini-batch apart) and
  the recompute compile for an H100, ptxas included, at shapes whose backward runs as the
  kernel (`gpu.backward_fits_kernel`), bf16 inputs, g = 16."""
  assert gpu.backward_fits_kernel(kind, d)
  op = functools.partial(getattr(pk, kind), checkpoint_group=16,
                         block_sizes=pk.BlockSizes(num_warps=8))
  _, lowered = _lower_for_h100(op, kind, d)
  assert f"{kind}_backward_triton" in lowered.as_text()
  lowered.compile()


def _lower_for_h100(op, kind, d):
  """`op` and its gradient lowered for a compile-only H100 (jax's CUDA plugin) at the 5B layer's
  per-GPU shape (6 heads, 23 mini-batches), bf16 inputs."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  mesh = Mesh(np.array(_cuda_plugin()[:1]), ("x",))
  shapes = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, PartitionSpec()))
            for s in _abstract_shapes(jnp.bfloat16, H=6, N=23, d=d, kind=kind)]
  loss = lambda *a: jnp.sum(op(*a).astype(jnp.float32))
  with use_abstract_mesh(mesh.abstract_mesh):  # the op's target: the H100, not this CPU
    return tuple(jax.jit(f).trace(*shapes).lower()
                 for f in (op, jax.grad(loss, range(len(shapes)))))


@pytest.mark.parametrize("group,P,W", [(16, 4, 1), (1, 4, 1), (16, 8, 1), (1, 8, 1), (16, 4, 2)],
                         ids=["g16", "g1-stored_states", "g16-P8", "g1-P8", "g16-wg2"])
def test_cluster_kernel_compiles_for_h100(group, P, W, d=64):
  """The cluster kernel (distributed shared memory, not the interpreter's global-memory path)
  and the op's gradient compile for an H100 at the 5B layer's shape per GPU (compile-only
  devices: jax's CUDA plugin, no GPU), with the backward's recompute (g = 16) and without
  (g = 1: the forward kernel stores bf16 states, one kernel in the gradient's module), and
  the forward on two warpgroups a CTA (221 KiB of shared memory, 255 registers a thread)."""
  op = functools.partial(pk.ttt_mlp, checkpoint_group=group,
                         block_sizes=pk.BlockSizes(cluster=P, warpgroups=W))
  for is_grad, lowered in enumerate(_lower_for_h100(op, "ttt_mlp", d)):
    text = lowered.as_text()
    assert "ttt_mlp_forward_cluster" in text
    assert ("ttt_mlp_backward_cluster" in text) == bool(is_grad)
    if group == 1 and is_grad:
      assert text.count("ttt_mlp_forward_cluster") == text.count("ttt_mlp_backward_cluster")
    lowered.compile()


@pytest.mark.parametrize("kind,dtype", LOWERINGS, ids=LOWERING_IDS)
def test_lowers_to_mosaic_for_abstract_tpu(kind, dtype):
  """Forward and backward kernels lower to Mosaic TPU custom calls on a CPU-only host (libtpu
  then compiles them: `test_compiles_for_tpu_with_libtpu`)."""
  v5p = AbstractDevice(device_kind="TPU v5", num_cores=1, platform="tpu")
  fwd, grad = _lower(v5p, "tpu", dtype, kind)
  assert f"{kind}_forward_tpu" in fwd and "tpu_custom_call" in fwd
  assert f"{kind}_forward_tpu" in grad and f"{kind}_backward_tpu" in grad


def _compile_for_tpu(kind, num_devices, checkpoint_group, topology="v5p:2x2x1", **shape_kw):
  """libtpu compiles `ttt_jax.ops`' op of `kind` (impl "auto": the TPU kernels, per shard, at
  the tuning table's sizes) and its gradient for the first `num_devices` of `topology` (a v5p
  chip unless given; compile-only devices, no TPU needed), bf16 inputs of
  `_abstract_shapes(**shape_kw)`, the heads over the tensor axis."""
  pytest.importorskip("libtpu")
  from jax.experimental import topologies
  from jax.sharding import NamedSharding, PartitionSpec

  from ttt_jax import ops, sharding
  devices = topologies.get_topology_desc(topology, platform="tpu").devices[:num_devices]
  mesh = sharding.make_mesh((1, 1, len(devices)), devices=devices)
  replicated = NamedSharding(mesh, PartitionSpec())
  shapes = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated)
            for s in _abstract_shapes(jnp.bfloat16, kind=kind, **shape_kw)]
  op = functools.partial(getattr(ops, kind), impl="auto", checkpoint_group=checkpoint_group)
  loss = lambda *a: jnp.sum(op(*a).astype(jnp.float32))
  with sharding.use_rules(mesh, (("batch", ("data", "fsdp")), ("heads", "tensor"))):
    for f in (op, jax.grad(loss, range(len(shapes)))):
      lowered = jax.jit(f).trace(*shapes).lower()
      assert lowered.as_text().count("tpu_custom_call") == (1 if f is op else 2)  # + backward
      lowered.compile()


def test_compiles_for_tpu_with_libtpu():
  """libtpu compiles both kernels for v5p devices under a mesh with the heads over the tensor
  axis, through `ttt_jax.ops` (the model's entry point): 48 heads over 4 devices, 12 a device
  as the 5B layer at tensor = 4, in grid steps of 3 as the table gives a v5p."""
  for kind in ("ttt_mlp", "ttt_linear"):
    _compile_for_tpu(kind, num_devices=4, checkpoint_group=16, H=48, N=32)


@pytest.mark.parametrize("topology", ("v5e:1x1", "v6e:1x1"))
def test_compiles_for_one_core_tpus_at_the_tables_sizes(topology):
  """The table gives the one-TensorCore v5e and v6e four heads a step (in one forward loop at
  d <= 64, a loop each at d = 128 on [b, d] tiles): libtpu compiles both kernels there at the
  configs' checkpoint_group = 16."""
  for d in (64, 128):
    _compile_for_tpu("ttt_mlp", num_devices=1, checkpoint_group=16, topology=topology, H=8,
                     N=32, b=64, d=d)


@pytest.mark.parametrize("b", (16, 64))
def test_tpu_backward_at_head_dim_128_gets_the_vmem_it_needs(b):
  """At d = 128 and the configs' checkpoint_group = 16 the backward's state stack outgrows
  Mosaic's default 16 MiB of scoped VMEM (libtpu refused it: "Scoped allocation with size
  18.67M and limit 16.00M"); `tpu_layout.fit_vmem` raises the limit and libtpu compiles it."""
  _compile_for_tpu("ttt_mlp", num_devices=1, checkpoint_group=16, H=2, N=32, b=b, d=128)


@pytest.mark.parametrize("b", (16, 32, 64))
@pytest.mark.parametrize("d", (16, 32, 64, 128))
def test_tpu_kernels_compile_over_the_shape_grid(b, d):
  """libtpu compiles the forward and backward kernels (bf16 inputs, TTT-MLP) for every
  mini-batch size and head dim the kernels take, not only the 5B shape: Mosaic's (8, 128)
  tiling treats 16-wide tiles apart from 64-wide ones."""
  _compile_for_tpu("ttt_mlp", num_devices=1, checkpoint_group=4, H=4, N=6, b=b, d=d)


def _dots(jaxpr):
  """Every dot_general in a jaxpr and the jaxprs inside it (kernel bodies, loops, custom
  VJPs): (its operand dtypes, its precision)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield tuple(v.aval.dtype for v in eqn.invars), eqn.params["precision"]
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else [param]):
        if isinstance(sub, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):  # (one class in jax 0.12)
          yield from _dots(getattr(sub, "jaxpr", sub))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_matmuls_take_the_default_precision(backend):
  """The kernels' matmuls (forward, recompute and reverse) run at jax's default matmul
  precision, as the pure op's einsums (one bf16 pass on a TPU: 2.3x fewer bundles in the v5p
  forward than f32 precision, benchmarks/tpu_schedule.py), unless
  `jax.default_matmul_precision` asks for more while they are traced. On bf16 inputs the TPU
  kernels round every matmul operand to bf16 (the reference kernel's recipe), backward too."""
  def dots(dtype, precision=None):
    args = _inputs(SHAPES["tiny"], dtype)
    op = functools.partial(pk.ttt_mlp, backend=backend, interpret=True, checkpoint_group=2)
    loss = lambda *a: jnp.sum(op(*a).astype(jnp.float32))
    with jax.default_matmul_precision(precision):
      jaxpr = jax.make_jaxpr(jax.grad(loss, range(len(args))))(*args)
    found = list(_dots(jaxpr.jaxpr))
    assert len(found) > 20  # the forward's 11 and the reverse's
    return {operands for operands, _ in found}, {p for _, p in found}

  f32, bf16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
  assert dots(jnp.float32) == ({(f32, f32)}, {None})  # None: the platform's default
  highest = (jax.lax.Precision.HIGHEST,) * 2
  assert dots(jnp.float32, "highest") == ({(f32, f32)}, {highest})
  if backend == "tpu":  # bf16 operands: one pass, said so (Mosaic refuses them at HIGHEST)
    default = (jax.lax.Precision.DEFAULT,) * 2
    assert dots(jnp.bfloat16) == dots(jnp.bfloat16, "highest") == ({(bf16, bf16)}, {default})
  else:
    assert dots(jnp.bfloat16)[0] == {(f32, f32)}


def test_ops_dispatch_by_impl():
  """`ttt_jax.ops` is the one entry point: impl picks the scan or the kernel."""
  from ttt_jax import ops
  args = _inputs(SHAPES["batched"])
  xla = ops.ttt_mlp(*args, impl="xla")
  kernel = ops.ttt_mlp(*args, impl="pallas")
  assert rel_err(np.asarray(kernel) - args[0], np.asarray(xla) - args[0]) <= 1e-5
  np.testing.assert_array_equal(ops.ttt_mlp(*args, impl="auto"), xla)  # CPU: the scan
  with pytest.raises(ValueError, match="impl='fast'"):
    ops.ttt_mlp(*args, impl="fast")
  with pytest.raises(ValueError, match="only available with impl='xla'"):
    ops.ttt_mlp(*args, impl="pallas", return_state=True)
  lin = _inputs(SHAPES["batched"], kind="ttt_linear")
  got = ops.ttt_linear(*lin, impl="pallas")
  assert rel_err(np.asarray(got) - lin[0], np.asarray(ops.ttt_linear(*lin)) - lin[0]) <= 1e-5


@pytest.mark.parametrize("variant", ["ttt_mlp", "ttt_linear"])
def test_ttt_layer_with_the_kernel_matches_the_scan(variant):
  """config.model.ttt.impl reaches the op: a 3-scene TTT layer, forward and gradients."""
  from flax import nnx

  from configs.default import get_config
  from ttt_jax import config as config_lib
  from ttt_jax.nn import TTTLayer
  config = get_config(f"seconds=9,variant={variant}")
  lay = config_lib.sequence_layout(config)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, lay.total_tokens, 64)), jnp.float32)
  results = {}
  for impl in ("xla", "pallas"):
    config.model.ttt.impl = impl
    layer = TTTLayer.from_config(config, rngs=nnx.Rngs(0))
    layer.base_lr = 1.0
    loss = lambda m: jnp.sum(jnp.sin(m(x, lay)))
    results[impl] = jax.jit(nnx.value_and_grad(loss))(layer)
  (a, ga), (b, gb) = results["pallas"], results["xla"]
  assert rel_err(a, b) <= 1e-5
  for (path, x1), (_, x2) in zip(nnx.to_flat_state(ga), nnx.to_flat_state(gb)):
    assert rel_err(x1[...], x2[...]) <= 1e-5, path


@pytest.mark.parametrize("mesh_shape", [(2, 1, 4), (1, 4, 2)], ids=["data2-tensor4", "fsdp4-tensor2"])
def test_kernel_runs_per_shard_under_a_mesh(mesh_shape):
  """Under a mesh the kernel runs per shard (heads over `tensor`, batch over data x fsdp) and
  the forward and all ten gradients equal the unsharded pure op (f32)."""
  from ttt_jax import ops, sharding
  shape = (4, 4, 3, 16, 16)
  args = _inputs(shape, seed=6)
  cot = jnp.asarray(np.random.default_rng(7).normal(size=shape), jnp.float32)
  loss = lambda impl: lambda *a: jnp.sum(ops.ttt_mlp(*a, impl=impl, checkpoint_group=2) * cot)
  want = jax.value_and_grad(loss("xla"), range(10))(*args)
  mesh = sharding.make_mesh(mesh_shape)
  rules = (("batch", ("data", "fsdp")), ("heads", "tensor"))
  with sharding.use_rules(mesh, rules):
    fn = jax.jit(jax.value_and_grad(loss("pallas"), range(10)))
    text = fn.trace(*args).lower().as_text()
    got = fn(*args)
  assert "shard_map" in text or "sdy.manual_computation" in text
  assert rel_err(got[0], want[0]) <= 1e-5
  for name, g, w in zip(NAMES, got[1], want[1]):
    assert rel_err(g, w) <= 1e-5, name


def test_mosaic_compat_applies_only_without_the_fix():
  """The get_cluster_ref backport replaces jax's only where it drops a peer ref's offset (jax
  before 0.12: no `to_memref_descriptor`), once; the H100 compile tests above lower every
  cluster kernel with it on jax 0.11.2 (the lent GPU image's) and without it on 0.12."""
  from jax.experimental.mosaic.gpu import utils
  from pallas_kernels.ttt import mosaic_compat
  fixed = hasattr(utils, "to_memref_descriptor")
  assert (utils.get_cluster_ref is mosaic_compat.get_cluster_ref) == (not fixed)
  assert not mosaic_compat.apply()  # (gpu_cluster_lib applied it at import, if at all)
