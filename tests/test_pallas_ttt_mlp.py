"""pallas_kernels.ttt_mlp (interpret mode on CPU) against the pure op, and Triton lowering."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh
from tests.oracles import random_ttt_inputs, rel_err

from pallas_kernels import ttt_mlp as pk
from pallas_kernels.ttt_mlp import reference
from pallas_kernels.ttt_mlp.forward import ttt_mlp_forward

SHAPES = {  # name: (B, H, N, b, d)
    "tiny": (1, 1, 3, 16, 16),
    "batched": (2, 2, 5, 16, 32),
    "paper_head": (1, 2, 4, 64, 64),  # the released model's b = d = 64
}
# Relative, on out - xq (the residual would hide errors in the LayerNorm branch). Kernel and
# pure op do the same f32 arithmetic in the same order, so f32 agrees to rounding; bf16 inputs
# only round the output.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
NAMES = ("xq", "xk", "xv", "eta", "ln_weight", "ln_bias", "W1", "b1", "W2", "b2")


def _inputs(shape, dtype=jnp.float32, seed=0):
  xq, xk, xv, eta, lw, lb, W = random_ttt_inputs("ttt_mlp", *shape, seed=seed)
  return tuple(jnp.asarray(a, dtype) for a in (xq, xk, xv, eta, lw, lb, *W))


@pytest.mark.parametrize("dtype", TOL, ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward_matches_pure_op(shape, dtype):
  args = _inputs(shape, dtype)
  got = jax.jit(functools.partial(pk.ttt_mlp, checkpoint_group=2))(*args)  # interpret: on CPU
  want = reference.ttt_mlp(*args)
  assert got.shape == shape and got.dtype == dtype
  xq = np.asarray(args[0], np.float32)
  assert rel_err(np.asarray(got, np.float32) - xq, np.asarray(want, np.float32) - xq) <= TOL[dtype]


def test_checkpoints_are_group_start_states():
  """The forward saves the state before mini-batches 0, g, 2g, ...: N = 3, g = 2 gives 2."""
  args = _inputs((2, 1, 3, 16, 16), seed=1)
  _, ckpts = ttt_mlp_forward(*args, eps=1e-6, checkpoint_group=2, interpret=True)
  xq, xk, xv, eta, lw, lb, *W = args
  _, after_2 = reference.ttt_mlp(xq[:, :, :2], xk[:, :, :2], xv[:, :, :2], eta[:, :, :2], lw, lb,
                                 *W, return_state=True)
  for name, c, w0, w2 in zip(NAMES[6:], ckpts, W, after_2):
    assert c.shape == (2, 1, 2) + w0.shape[1:], name
    np.testing.assert_array_equal(c[:, :, 0], jnp.broadcast_to(w0, (2,) + w0.shape), name)
    assert rel_err(c[:, :, 1], w2) <= 1e-6, name


# N = 5, g = 2: two full groups and a remainder (padded in the backward); g = None: one group.
@pytest.mark.parametrize("shape,group", [(SHAPES["batched"], 2), (SHAPES["paper_head"], None)],
                         ids=["batched-g2", "paper_head-one_group"])
def test_gradients_match_pure_op(shape, group):
  args = _inputs(shape, seed=2)
  cot = jnp.asarray(np.random.default_rng(3).normal(size=shape), jnp.float32)

  def grads(op, **kw):
    loss = lambda *a: jnp.sum(op(*a, **kw) * cot)
    return jax.jit(jax.grad(loss, range(len(args))))(*args)

  got = grads(pk.ttt_mlp, checkpoint_group=group)
  want = grads(reference.ttt_mlp, checkpoint_group=None)  # remat does not change the math
  for name, g, w in zip(NAMES, got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    # Same formulas, but the backward recomputes groups under vmap and sums the batch and the
    # group contributions in another order than the pure op's scan: f32 rounding only
    # (measured <= 4e-7).
    assert rel_err(g, w) <= 1e-5, name


def test_bad_shapes_raise():
  args = list(_inputs(SHAPES["tiny"]))
  args[3] = args[3][..., :-1]  # eta one token short
  with pytest.raises(ValueError, match="eta must be"):
    pk.ttt_mlp(*args)


def test_block_sizes_table():
  assert pk.get_block_sizes("NVIDIA H100 80GB HBM3", jnp.bfloat16, 64).num_warps == 8
  assert pk.get_block_sizes("cpu", jnp.float32, 64) == pk.BlockSizes()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_lowers_to_triton_for_abstract_h100(dtype):
  """Forward and backward lower for CUDA on a CPU-only host; the kernel is a Triton call."""
  B, H, N, b, d = 1, 2, 5, 64, 64
  S = jax.ShapeDtypeStruct
  shapes = [S((B, H, N, b, d), dtype)] * 3 + [S((B, H, N, b), dtype)] + [S((H, d), dtype)] * 2
  shapes += [S((H, d, 4 * d), dtype), S((H, 1, 4 * d), dtype), S((H, 4 * d, d), dtype),
             S((H, 1, d), dtype)]
  h100 = AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
  mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=h100)
  op = functools.partial(pk.ttt_mlp, checkpoint_group=2)  # interpret=None: False for a GPU
  loss = lambda *a: jnp.sum(op(*a).astype(jnp.float32))
  with use_abstract_mesh(mesh):
    for f in (op, jax.grad(loss, range(10))):
      text = jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
      assert "__gpu$xla.gpu.triton" in text
      assert "num_warps = 8 : i32" in text  # the table's H100 entry was used


def test_ops_dispatch_by_impl():
  """`ttt_jax.ops` is the one entry point: impl picks the scan or the kernel."""
  from ttt_jax import ops
  args = _inputs(SHAPES["batched"])
  xla = ops.ttt_mlp(*args, impl="xla")
  kernel = ops.ttt_mlp(*args, impl="pallas")
  assert rel_err(np.asarray(kernel) - args[0], np.asarray(xla) - args[0]) <= 1e-5
  np.testing.assert_array_equal(ops.ttt_mlp(*args, impl="auto"), xla)  # CPU: no kernel built
  with pytest.raises(ValueError, match="impl='fast'"):
    ops.ttt_mlp(*args, impl="fast")
  with pytest.raises(ValueError, match="only available with impl='xla'"):
    ops.ttt_mlp(*args, impl="pallas", return_state=True)
  lin = random_ttt_inputs("ttt_linear", 1, 1, 2, 16, 16)
  with pytest.raises(ValueError, match="no Pallas kernel for ttt_linear"):
    ops.ttt_linear(*lin[:6], *lin[6], impl="pallas")


def test_ttt_layer_with_the_kernel_matches_the_scan():
  """config.model.ttt.impl reaches the op: a 3-scene TTT layer, forward and gradients."""
  from flax import nnx

  from configs.default import get_config
  from ttt_jax import config as config_lib
  from ttt_jax.nn import TTTLayer
  config = get_config("seconds=9")
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
