"""Checkpoint import/export: PyTorch-named tensors <-> our nnx parameters, orbax on disk.

  import_diffusers(dir, config)  diffusers CogVideoX transformer folder -> DiT (TTT params and
                                 gates keep their seeded init, spec 3.9 / 7.2)
  import_upstream(path, config)  a ttt-video-dit state dict (safetensors or torch zip) -> DiT
  state_dict(module) / load_state_dict(module, tensors)   upstream names, any module
  save(model, dir, config) / restore(dir) -> DiT          orbax checkpoint + its config

Every import first checks the whole checkpoint against the model -- missing, unexpected,
mis-shaped and non-float tensors are listed by name -- and only then reads tensors, one at a
time (a stacked parameter is filled layer by layer into one buffer), so converting the 5B model
needs its own size plus one stacked tensor of host memory, not twice the model.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ttt_jax.checkpoint import names
from ttt_jax.checkpoint.tensor_files import CheckpointError, open_tensors

_CONFIG_FILE = "ttt_jax_config.json"


def _params(module) -> dict:
  return {tuple(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _entries(module) -> list[names.Entry]:
  config = getattr(module, "config", None)
  return names.entries(_params(module), getattr(config, "patch_size", None))


def state_dict(module, prefix: str = "") -> dict[str, np.ndarray]:
  """The module's parameters under upstream's names and PyTorch layouts (numpy)."""
  params, out = _params(module), {}
  for e in _entries(module):
    value = np.asarray(params[e.path][...])
    for i, name in enumerate(e.names):
      out[prefix + name] = e.to_torch(value[i] if e.stacked else value)
  return out


def _get(tensors, key) -> np.ndarray:
  value = tensors[key]
  return value.load() if hasattr(value, "load") else np.asarray(value)


def load_state_dict(module, tensors, prefix: str = "", *, rename=None,
                    optional=lambda path: False) -> list[tuple[str, ...]]:
  """Loads upstream-named tensors into `module` in place.

  Args:
    tensors: mapping name -> array, or a lazy `TensorSource` (entries with .shape, .dtype, .load).
    prefix: prepended to every upstream name (e.g. 'dit.').
    rename: optional function source name -> upstream name (None: the tensor has no place).
    optional: parameters (by path) that may be absent; they keep their current values.

  Returns the paths left at their current values. Raises CheckpointError listing every
  missing, unexpected, mis-shaped or non-float tensor; nothing is assigned then.
  """
  rename = rename or (lambda k: k)
  by_name = {}
  unexpected = []
  for key in tensors:
    name = rename(key)
    if name is None or not name.startswith(prefix):
      unexpected.append(key)
    else:
      by_name[name[len(prefix):]] = key
  params, problems, kept, plan = _params(module), [], [], []
  for e in _entries(module):
    found = [by_name.pop(n, None) for n in e.names]
    if all(k is None for k in found) and optional(e.path):
      kept.append(e.path)
      continue
    for name, key in zip(e.names, found):
      if key is None:
        problems.append(f"missing: {prefix}{name} (for {'/'.join(e.path)})")
        continue
      info = tensors[key]
      if tuple(info.shape) != e.torch_shape:
        problems.append(f"wrong shape: {key} is {tuple(info.shape)}, expected {e.torch_shape}")
      elif not jnp.issubdtype(info.dtype, jnp.floating):
        problems.append(f"wrong dtype: {key} is {info.dtype}, expected a float type")
    plan.append((e, found))
  unexpected += sorted(by_name.values())
  problems += [f"unexpected: {k}" for k in sorted(unexpected)]
  if problems:
    raise CheckpointError(f"checkpoint does not match the model ({len(problems)} problem(s)); "
                          "nothing was loaded:\n  " + "\n  ".join(problems))
  for e, found in plan:
    param = params[e.path]
    shape, dtype = param[...].shape, param[...].dtype
    if e.stacked:
      buf = np.empty(shape, np.dtype(dtype))
      for i, key in enumerate(found):
        buf[i] = e.from_torch(_get(tensors, key).astype(dtype))
    else:
      buf = e.from_torch(_get(tensors, found[0]).astype(dtype))
    param[...] = jnp.asarray(buf)  # the old array is freed here, before the next tensor
  return kept


def _is_ttt(path) -> bool:
  return "ssm" in path or any(p.endswith("_ssm_gating_text") or p.endswith("_ssm_gating_video")
                              for p in path)


def new_model(config, seed: int = 0):
  from ttt_jax.nn.dit import DiT  # here, not at the top: ttt_jax.nn imports nothing of this
  return DiT.from_config(config, rngs=nnx.Rngs(seed))


def import_diffusers(path, config, *, seed: int = 0):
  """A diffusers `CogVideoXTransformer3DModel` folder (or safetensors file) -> DiT.

  TTT parameters and gates are not in CogVideoX; they keep the seeded init of `DiT` (spec 7.2:
  torch's random draws cannot be matched, the distributions are spec 3.9's).
  """
  model = new_model(config, seed)
  with open_tensors(path) as tensors:
    load_state_dict(model, tensors, rename=names.diffusers_to_upstream, optional=_is_ttt)
  return model


def import_upstream(path, config, *, seed: int = 0):
  """A ttt-video-dit state dict (safetensors / torch zip, keys `dit.*` or bare) -> DiT."""
  model = new_model(config, seed)
  with open_tensors(path) as tensors:
    prefix = "dit." if any(k.startswith("dit.") for k in tensors) else ""
    load_state_dict(model, tensors, prefix)
  return model


def save(model, directory, config) -> pathlib.Path:
  """Writes the model's parameters (orbax, atomic: a crash leaves no half checkpoint) and the
  config it was built from."""
  import orbax.checkpoint as ocp

  directory = pathlib.Path(directory).absolute()
  if directory.exists():
    raise CheckpointError(f"{directory} exists; choose a new output directory.")
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / "params", params)
  (directory / _CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
  return directory


def restore(directory, config=None, mesh=None):
  """Reads a checkpoint written by `save` into a new DiT (config: the saved one by default).

  With a `mesh`, every parameter is read straight into its sharding (config.sharding.rules):
  no host materialises a whole parameter.
  """
  import orbax.checkpoint as ocp

  from ttt_jax import sharding

  directory = pathlib.Path(directory).absolute()
  if not (directory / "params").is_dir():
    raise CheckpointError(f"{directory} is not a ttt-jax checkpoint (no params/ inside); "
                          "write one with `launch/import_checkpoint.py` or ttt_jax.checkpoint.save.")
  if config is None:
    config = ml_collections.ConfigDict(json.loads((directory / _CONFIG_FILE).read_text()))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: new_model(config)))
  shapes = nnx.to_pure_dict(abstract)
  if mesh is not None:
    shardings = nnx.to_pure_dict(sharding.param_shardings(abstract, mesh, config.sharding.rules))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          shapes, shardings)
  else:
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), shapes)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(directory / "params", target)
  nnx.replace_by_pure_dict(abstract, restored)
  return nnx.merge(graphdef, abstract)
