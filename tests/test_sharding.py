"""Sharded DiT forward and gradient step on 8 CPU devices equal the single-device result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.default import get_config
from tests.oracles import rel_err
from ttt_jax import sharding
from ttt_jax.nn.dit import DiT


def _setup(variant="ttt_mlp", seconds=9):
  config = get_config(f"seconds={seconds},variant={variant}")
  rng = np.random.default_rng(0)
  m, s = config.model, config.sequence
  video = rng.normal(size=(4, s.num_frames, m.in_channels, m.latent_height,
                           m.latent_width)).astype(np.float32)
  text = rng.normal(size=(4, s.num_chunks, s.text_length, m.text_dim)).astype(np.float32)
  return config, (video, text, np.asarray([1.0, 200.0, 500.0, 999.0], np.float32))


def _make(config):
  def make():
    model = DiT.from_config(config, rngs=nnx.Rngs(0))
    # O(1) TTT step sizes and gates so the TTT branch matters in the comparison.
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      if path[-1] == "gating_alpha":
        var[...] = jnp.full_like(var[...], 0.5)
    return model
  return make


def _loss(model, video, text, t):
  return jnp.mean(jnp.square(model(video, text, t) - video))


def _sgd_step(model, video, text, t):
  """A gradient step on every parameter: what the train step will do, minus the optimizer."""
  loss, grads = nnx.value_and_grad(_loss)(model, video, text, t)
  params = nnx.state(model, nnx.Param)
  new = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
  return loss, new


@pytest.fixture(scope="module")
def reference():
  config, inputs = _setup()
  model = _make(config)()
  return jax.jit(lambda m, *a: m(*a))(model, *inputs), jax.jit(_sgd_step)(model, *inputs)


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 2, 4), (1, 4, 2)])
def test_sharded_forward_and_step_match_single_device(mesh_shape, reference):
  assert len(jax.devices()) == 8, "conftest sets 8 host devices"
  config, inputs = _setup()
  config.sharding.mesh_shape = mesh_shape
  ref_out, (ref_loss, ref_params) = reference

  mesh = sharding.mesh_from_config(config)
  rules = config.sharding.rules
  sharded = sharding.create_sharded(_make(config), mesh, rules)
  traces = []

  def step(m, *a):
    traces.append(1)
    return _sgd_step(m, *a)

  batch = [sharding.shard_batch(x, mesh, rules) for x in inputs]
  fwd = sharding.jit_sharded(lambda m, *a: m(*a), mesh, rules)
  out = fwd(sharded, *batch)
  assert rel_err(out, ref_out) <= 1e-5
  assert len(out.sharding.device_set) == 8

  step_fn = sharding.jit_sharded(step, mesh, rules)
  loss, params = step_fn(sharded, *batch)
  loss2, _ = step_fn(sharded, *batch)
  assert len(traces) == 1  # traced once, reused
  assert rel_err(loss, ref_loss) <= 1e-5 and float(loss2) == float(loss)
  assert rel_err(_flat(params), _flat(ref_params)) <= 1e-5
  # Per parameter: sums over shards change the reduction order, which shows in the tiny
  # (1e-9) step of zero-initialised step-size biases at ~1e-5; everything else is far tighter.
  for (path, a), (_, b) in zip(nnx.to_flat_state(params), nnx.to_flat_state(ref_params)):
    assert rel_err(a[...], b[...]) <= 1e-4, path


def test_parameters_are_created_sharded_with_logical_axes():
  config, _ = _setup()
  config.sharding.mesh_shape = (1, 2, 4)
  mesh = sharding.mesh_from_config(config)
  model = sharding.create_sharded(_make(config), mesh, config.sharding.rules)
  specs = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    path = tuple(map(str, path))
    sharding.param_logical_axes(path, var[...].ndim)  # every parameter has logical axes
    specs["/".join(path)] = var[...].sharding.spec
  P = jax.sharding.PartitionSpec
  assert specs["layers/seq_modeling_block/ssm/W1"] == P(None, "tensor", None, None)
  assert specs["layers/seq_modeling_block/q/kernel"] == P(None, "fsdp", "tensor")
  # Megatron MLP: layer1 columns and layer2 rows over tensor, FSDP over the model width.
  assert specs["layers/mlp/layer1/kernel"] == P(None, "fsdp", "tensor")
  assert specs["layers/mlp/layer2/kernel"] == P(None, "tensor", "fsdp")
  assert specs["transformer_norm/scale"] == P(None)


def test_unknown_parameter_has_no_logical_axes():
  with pytest.raises(ValueError, match="add a rule to ttt_jax.sharding.PARAM_AXES"):
    sharding.param_logical_axes(("layers", "lora", "A"), 3)


@pytest.mark.parametrize("shape, heads, match", [
    ((3, 1, 1), 4, "8 are available"),
    ((-1, 3, 1), 4, "not divisible by the fixed axes"),
    ((1, 1, 8), 4, "mesh axis 'tensor'=8 must divide model.num_heads=4"),
    ((1, 1), 4, "needs 3 entries"),
    ((-1, -1, 2), 4, "at most one axis"),
])
def test_bad_meshes_fail_before_compiling(shape, heads, match):
  with pytest.raises(sharding.MeshError, match=match):
    sharding.make_mesh(shape, num_heads=heads, model_dim=64)


def test_batch_not_divisible_by_the_batch_axes():
  mesh = sharding.make_mesh((1, 8, 1))
  with pytest.raises(sharding.MeshError, match=r"batch size 4 is not divisible by the mesh axes"):
    sharding.shard_batch(np.zeros((4, 3)), mesh, get_config("").sharding.rules)


def test_checkpoint_restores_into_the_target_sharding(tmp_path):
  from ttt_jax.checkpoint import convert
  config, inputs = _setup()
  model = _make(config)()
  convert.save(model, tmp_path / "ckpt", config)
  config.sharding.mesh_shape = (2, 2, 2)
  mesh = sharding.mesh_from_config(config)
  restored = convert.restore(tmp_path / "ckpt", config, mesh=mesh)
  want = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for path, var in nnx.to_flat_state(nnx.state(restored, nnx.Param)):
    axes = sharding.param_logical_axes(tuple(map(str, path)), var[...].ndim)
    assert var[...].sharding.spec == sharding.logical_to_spec(axes, config.sharding.rules)
    np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(want[path][...]))
