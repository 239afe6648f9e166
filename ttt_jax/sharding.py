"""Meshes and logical-axis sharding (the flax lm1b way: names in the model, one rules table).

Parameters get logical axes from their path (`PARAM_AXES`, first match wins; every parameter
must match one); activations are annotated in the layer code with `constrain(x, names)`. The
config's `sharding.rules` maps logical names to mesh axes:

  batch  -> (data, fsdp)   embed -> fsdp (FSDP of every large weight)
  heads  -> tensor         attention and TTT heads per tensor shard (each shard runs the TTT
                           inner loop for its own heads, as upstream, spec 6.6)
  mlp    -> tensor         Megatron MLP: layer1 columns / layer2 rows per tensor shard
  length -> tensor         sequence-parallel norms around the MLP (Megatron-SP)

Why these (5B, bf16, remat "full", 32x8 H100 = mesh 1x64x4, per-device GiB from
`launch/compile_only.py`; the README has every duration):

* `length -> tensor`: the scan over layers saves every layer's input for the backward pass,
  [42, S, 3072] bf16 = 82 GiB per sample at 63 s. With `length -> None` (plain Megatron) nothing
  shards it by token, XLA keeps it whole on every tensor shard and the 63 s train step needs
  155 GiB; with `length -> tensor` it is stored token-sharded ([42, S/4, 3072]): 65 GiB.
* `mlp -> tensor`: each tensor shard gathers (FSDP) and holds a quarter of the 12288-wide MLP
  weights instead of all of them; the MLP's tokens are gathered instead (Megatron-SP).
* The attention windows are cut per sample (`attention.segment_windows` constrains them to the
  batch axes): left to propagation from the token-sharded residual, XLA cut the whole global
  batch's windows on every device (bf16[384, 18021, 3072] at 18 s): 79.7 GiB in the 18 s
  forward, 3.4 GiB with the constraint. That, not the sequence-parallel MLP, was the 18/30 s
  blow-up.

`constrain` and `per_shard` are no-ops outside `use_rules` (single device, tests).
"""

from __future__ import annotations

import contextlib
import contextvars
import re

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Parameter path (joined by '/', the stacked-layer prefix removed) -> logical axes per dim.
PARAM_AXES = (
    (r"patch_embedding/(vid_proj|text_proj)/kernel", (None, "embed")),
    (r"time_embed_0/kernel", ("embed", None)),
    (r"time_embed_2/kernel", (None, None)),
    (r".*adaLN_modulation/kernel", (None, "embed")),
    (r"seq_modeling_block/(q|k|v)/kernel", ("embed", "heads")),
    (r"seq_modeling_block/ssm/(wq|wk|wv)/kernel", ("embed", "heads")),
    (r"seq_modeling_block/(o|ssm/wo)/kernel", ("heads", "embed")),
    (r"seq_modeling_block/ssm/learnable_ttt_lr_weight", ("heads", None, "embed")),
    (r"seq_modeling_block/ssm/(W1|b1|W2|b2)", ("heads", None, None)),
    (r"seq_modeling_block/ssm/(ttt_norm_weight|ttt_norm_bias|learnable_ttt_lr_bias)",
     ("heads", None)),
    (r"mlp/layer1/kernel", ("embed", "mlp")),
    (r"mlp/layer2/kernel", ("mlp", "embed")),
    (r"final_layer/linear/kernel", ("embed", None)),
    # Vectors: biases, norm scales, gates. Small; replicated.
    (r".*/(bias|scale|gating_alpha)", (None,)),
)

_ACTIVE = contextvars.ContextVar("ttt_jax_sharding_rules", default=None)


class MeshError(ValueError):
  """The mesh does not fit the devices or the model; the message names the axis."""


def make_mesh(mesh_shape, devices=None, *, num_heads: int | None = None,
              model_dim: int | None = None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh; one -1 entry takes the remaining devices.

  Checks, before anything compiles, that the shape uses every device and that the tensor axis
  divides the heads and the fsdp axis the model width.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = list(mesh_shape)
  if len(shape) != len(MESH_AXES):
    raise MeshError(f"sharding.mesh_shape={tuple(mesh_shape)} needs {len(MESH_AXES)} entries "
                    f"for axes {MESH_AXES}.")
  if shape.count(-1) > 1:
    raise MeshError(f"sharding.mesh_shape={tuple(mesh_shape)}: at most one axis may be -1.")
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    if len(devices) % rest:
      raise MeshError(f"sharding.mesh_shape={tuple(mesh_shape)}: {len(devices)} devices are not "
                      f"divisible by the fixed axes ({rest}).")
    shape[shape.index(-1)] = len(devices) // rest
  if int(np.prod(shape)) != len(devices):
    raise MeshError(f"sharding.mesh_shape={tuple(mesh_shape)} = {int(np.prod(shape))} devices, "
                    f"but {len(devices)} are available; make the product match or use -1.")
  sizes = dict(zip(MESH_AXES, shape))
  if num_heads is not None and num_heads % sizes["tensor"]:
    raise MeshError(f"mesh axis 'tensor'={sizes['tensor']} must divide model.num_heads="
                    f"{num_heads} (each tensor shard runs whole heads).")
  if model_dim is not None and model_dim % sizes["fsdp"]:
    raise MeshError(f"mesh axis 'fsdp'={sizes['fsdp']} must divide model.model_dim={model_dim}.")
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                           axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(config, devices=None) -> jax.sharding.Mesh:
  return make_mesh(config.sharding.mesh_shape, devices, num_heads=config.model.num_heads,
                   model_dim=config.model.model_dim)


def param_logical_axes(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
  """Logical axes of one parameter; stacked layers get a leading 'layers' axis."""
  stacked = path[0] == "layers"
  name = "/".join(path[1:] if stacked else path)
  for pattern, axes in PARAM_AXES:
    if re.fullmatch(pattern, name):
      axes = ("layers",) + axes if stacked else axes
      if len(axes) != ndim:
        raise ValueError(f"sharding rule {pattern!r} gives {len(axes)} axes for {name}, "
                         f"which has {ndim} dims; fix PARAM_AXES.")
      return axes
  raise ValueError(f"parameter {'/'.join(path)} has no logical axes; add a rule to "
                   "ttt_jax.sharding.PARAM_AXES.")


def logical_to_spec(axes, rules) -> PartitionSpec:
  table = dict(rules)
  return PartitionSpec(*(table.get(a) if a is not None else None for a in axes))


def param_shardings(state, mesh, rules):
  """NamedShardings for an nnx State (or abstract State) of parameters, same structure."""
  def one(path, var):
    axes = param_logical_axes(tuple(map(str, path)), len(var.shape))
    return var.replace(NamedSharding(mesh, logical_to_spec(axes, rules)))
  return nnx.map_state(one, state)


@contextlib.contextmanager
def use_rules(mesh, rules):
  """Within this context (while tracing), `constrain` applies the rules on `mesh`."""
  token = _ACTIVE.set((mesh, tuple(map(tuple, rules))))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


_PLATFORMS = {"cuda": "gpu", "rocm": "gpu"}


def target_device() -> tuple[str, str]:
  """(platform, device kind) being compiled for; platform is "tpu", "gpu" or "cpu".

  The devices of the active mesh (concrete, or compile-only ones of a named topology), else the
  abstract mesh's device, else the default backend's first device. Kernel choices (splash's
  interpret mode, the TTT op's `impl="auto"`, the Pallas kernels' tuning table) follow this, so
  compiling on a CPU host for a TPU slice or a GPU cluster lowers what that platform will run.
  """
  state = _ACTIVE.get()
  if state is not None:
    device = state[0].devices.flat[0]
  else:
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  if device is None:
    device = jax.devices()[0]
  platform = device.platform.lower()
  return _PLATFORMS.get(platform, platform), device.device_kind


def target_platform() -> str:
  """The platform of `target_device()`: "tpu", "gpu" or "cpu"."""
  return target_device()[0]


def per_shard(fn, axes, *args, arg_axes=None):
  """`fn(*args)` run on each shard under `shard_map` over the active mesh (or once, unsharded,
  outside `use_rules`). The output has the logical `axes`, and so does every argument unless
  `arg_axes` gives one logical-axes tuple per argument.

  For kernels XLA cannot partition (Mosaic/Triton Pallas calls, cuDNN custom calls). A mesh axis
  that does not divide its dimension (in the first argument, for `axes`) is left out there
  (that dimension is whole per shard).
  """
  state = _ACTIVE.get()
  if state is None:
    return fn(*args)
  mesh, rules = state

  def spec_for(names, shape):
    spec = []
    for axis, size in zip(logical_to_spec(names, rules), shape):
      mesh_axes = axis if isinstance(axis, tuple) else (axis,) if axis is not None else ()
      ways = int(np.prod([mesh.shape[a] for a in mesh_axes]))
      spec.append(axis if mesh_axes and size % ways == 0 else None)
    return PartitionSpec(*spec)

  out_spec = spec_for(axes, args[0].shape)
  if arg_axes is None:
    in_specs = (out_spec,) * len(args)
  else:
    in_specs = tuple(spec_for(a, x.shape) for a, x in zip(arg_axes, args, strict=True))
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec,
                       check_vma=False)(*args)


def constrain(x, axes):
  """Sharding constraint by logical axis names; a no-op outside `use_rules`."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules)))


def batch_sharding(mesh, rules, ndim: int) -> NamedSharding:
  """Inputs: the leading (batch) axis over the batch mesh axes, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def batch_axes(mesh, rules) -> tuple[tuple[str, ...], int]:
  """The mesh axes the batch is split over, and into how many pieces."""
  spec = batch_sharding(mesh, rules, 1).spec[0]
  axes = tuple(a for a in (spec if isinstance(spec, tuple) else (spec,)) if a is not None)
  return axes, int(np.prod([mesh.shape[a] for a in axes]))


def shard_batch(x, mesh, rules):
  """Puts a host array on the mesh, batch-sharded; checks the batch divides the batch axes."""
  spec = batch_sharding(mesh, rules, np.ndim(x))
  axes, ways = batch_axes(mesh, rules)
  if np.shape(x)[0] % ways:
    raise MeshError(f"batch size {np.shape(x)[0]} is not divisible by the mesh axes {axes} "
                    f"({ways} ways); change the batch size or sharding.mesh_shape.")
  return jax.device_put(x, spec)


def create_sharded(make_module, mesh, rules):
  """Builds `make_module()` with every parameter created directly in its sharding.

  The module is traced abstractly first (`nnx.eval_shape`), then initialised inside a jit whose
  out_shardings are the parameter shardings: no host ever holds a whole parameter.
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(make_module))
  shardings = param_shardings(abstract, mesh, rules)
  state = jax.jit(lambda: nnx.split(make_module())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def jit_sharded(fn, mesh, rules, **jit_kwargs):
  """`jax.jit(fn)` whose tracing sees the logical rules (so `constrain` inside applies)."""
  def traced(*args, **kwargs):
    with use_rules(mesh, rules):
      return fn(*args, **kwargs)
  traced.__name__ = getattr(fn, "__name__", "sharded_fn")
  return jax.jit(traced, **jit_kwargs)
