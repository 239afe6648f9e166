"""Ahead-of-time compilation from shapes: topologies, abstract model and batch, steps, memory.

Nothing here materialises a parameter: the model is traced with `nnx.eval_shape`, every
argument is a `jax.ShapeDtypeStruct` carrying its `NamedSharding`, and `jit(...).trace(...)
.lower().compile()` runs for the devices of a named topology, which need not be attached:

  cpu-N        N host CPU devices (--xla_force_host_platform_device_count=N before jax starts)
  v5p-256 ...  Cloud TPU slice names (v4/v5p count TensorCores, 2 per chip; v5e/v6e count
               chips); compile-only TPU devices from libtpu (`pip install -e .[tpu]`), no TPU
               needed. `v5p:4x4x8` (jax's chip-grid form) is accepted too.
  h100-8x32    8 GPUs per host x 32 hosts (h100, h200): compile-only CUDA devices from jax's
               CUDA plugin and a built-in target description, no GPU needed.

`launch/compile_only.py` is the command line over this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, topologies

from ttt_jax import config as config_lib
from ttt_jax import sharding
from ttt_jax.nn.dit import DiT

GIB = 2 ** 30
STEPS = ("forward", "train", "sample")

# Cloud TPU names: generation -> (jax's topology prefix, grid dims, TensorCores per device).
# v4 and v5p are named by TensorCores but jax sees one megacore device per chip.
_TPU_KINDS = {"v4": ("v4", 3, 2), "v5p": ("v5p", 3, 2), "v5e": ("v5e", 2, 1),
              "v5litepod": ("v5e", 2, 1), "v6e": ("v6e", 2, 1)}
_GPU_PREFIXES = ("h100", "h200", "b200", "a100", "gpu", "cuda")

# Deviceless CUDA targets: the fields of stream_executor's GpuTargetConfigProto that XLA's GPU
# compiler reads, with each GPU's published numbers (as openxla/xla's target_config/specs).
_GPU_SPECS = {
    "h100": dict(name="NVIDIA H100 80GB HBM3", memory=84942979072, bandwidth=3352320000000),
    "h200": dict(name="NVIDIA H200 141GB HBM3e", memory=151397597184, bandwidth=4800000000000),
}
_HOPPER_TARGET = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{name}"
"""


class TopologyError(ValueError):
  """The topology name is not one we can compile for here; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  platform: str  # "cpu", "tpu" or "cuda"
  devices: tuple

  @property
  def num_devices(self) -> int:
    return len(self.devices)


def _chip_grid(chips: int, ndim: int) -> tuple[int, ...]:
  """The usual slice shape: sides doubled in turn, smallest first, a side of 1 last
  (v5p: 4 chips 2x2x1, 16 2x2x4, 128 4x4x8; v5e: 8 2x4, 64 8x8)."""
  if chips < 1 or chips & (chips - 1):
    raise TopologyError(f"{chips} chips is not a power of two; give the grid as e.g. v5p:4x4x8.")
  grid = [1] * ndim
  for i in range(chips.bit_length() - 1):
    grid[i % ndim] *= 2
  return tuple(sorted(g for g in grid if g > 1)) + (1,) * grid.count(1)


def tpu_topology_name(name: str) -> str:
  """Our name ('v5p-256', 'v5e-64', 'v5p:4x4x8') -> jax's ('v5p:4x4x8')."""
  m = re.fullmatch(r"(v4|v5p|v5e|v6e|v5litepod)(?:-(\d+)|:(\d+(?:x\d+)+))", name)
  if not m:
    raise TopologyError(f"--topology={name!r}: use e.g. v5p-256, v5e-64, v6e-16 or v5p:4x4x8.")
  kind, ndim, cores = _TPU_KINDS[m.group(1)]
  if m.group(3):
    return f"{kind}:{m.group(3)}"
  count = int(m.group(2))
  if count % cores:
    raise TopologyError(f"--topology={name!r}: {m.group(1)} slices count TensorCores, "
                        f"{cores} per chip; use a multiple of {cores}.")
  return f"{kind}:" + "x".join(map(str, _chip_grid(count // cores, ndim)))


def _gpu_topology(name: str):
  """'h100-8x32' (8 GPUs per host x 32 hosts) or 'h200-8' -> compile-only CUDA devices."""
  m = re.fullmatch(r"(h100|h200)-(\d+)(?:x(\d+))?", name)
  if not m:
    raise TopologyError(f"--topology={name!r}: GPU topologies are {sorted(_GPU_SPECS)} as "
                        "<gpu>-<per host>x<hosts>, e.g. h100-8x32.")
  per_host, hosts = int(m.group(2)), int(m.group(3) or 1)
  try:
    return topologies.get_topology_desc(
        m.group(1), platform="cuda", target_config=_HOPPER_TARGET.format(**_GPU_SPECS[m.group(1)]),
        topology=f"1x{hosts}x{per_host}").devices  # partitions x hosts x devices per host
  except (NotImplementedError, RuntimeError) as e:
    raise TopologyError(
        f"--topology={name!r} needs jax's CUDA plugin for compile-only GPU devices (no GPU "
        "needed): pip install -e '.[cuda]' (or, without the CUDA libraries, pip install --no-deps "
        "jax-cuda12-plugin==$V jax-cuda12-pjrt==$V with V the jax version, plus "
        "nvidia-cudnn-cu12, and set JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 so that the plugin loads "
        f"without the other CUDA libraries). jax said: {e}") from e


def get_topology(name: str) -> Topology:
  """Devices of a named topology (compile-only for TPU and GPU)."""
  if m := re.fullmatch(r"cpu-(\d+)", name):
    want = int(m.group(1))
    devices = jax.devices("cpu")
    if len(devices) != want:
      raise TopologyError(f"--topology={name!r} needs {want} host devices but jax has "
                          f"{len(devices)}: set XLA_FLAGS=--xla_force_host_platform_device_count="
                          f"{want} before jax starts (launch/compile_only.py does).")
    return Topology(name, "cpu", tuple(devices))
  if name.split("-")[0].lower().startswith(_GPU_PREFIXES):
    return Topology(name, "cuda", tuple(_gpu_topology(name.lower())))
  jax_name = tpu_topology_name(name)
  try:
    devices = topologies.get_topology_desc(jax_name, platform="tpu").devices
  except RuntimeError as e:
    if "not installed" in str(e):  # jax found no libtpu
      raise TopologyError(f"--topology={name!r} ({jax_name}) needs libtpu for compile-only TPU "
                          "devices: pip install -e '.[tpu]' (no TPU needed).") from e
    raise TopologyError(f"--topology={name!r} ({jax_name}): libtpu failed: {e}") from e
  return Topology(name, "tpu", tuple(devices))


def default_tensor(seconds: int) -> int:
  """Tensor-parallel size of the default mesh: 1 up to 9 s (a sample's activations fit one
  device: 9 s train 35 GiB on H100), 4 from 18 s (heads, MLP columns and the saved residuals
  split 4 ways; 63 s train on 32x8 H100 is the bound, README memory table)."""
  return 1 if seconds <= 9 else 4


def default_mesh_shape(num_devices: int, tensor: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor): the 5B model's f32 parameters (29 GB) need FSDP over the rest."""
  if num_devices % tensor:
    raise sharding.MeshError(f"tensor={tensor} does not divide the {num_devices} devices.")
  return (1, num_devices // tensor, tensor)


def sample_mesh_shape(num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) for sampling one video: its CFG batch of 2 (unconditional and
  conditional) over fsdp, the rest tensor-parallel (one host: 8 GPUs -> 1x2x4)."""
  if num_devices == 1:
    return (1, 1, 1)
  if num_devices % 2:
    raise sharding.MeshError(f"sampling splits its CFG batch of 2 over fsdp; {num_devices} "
                             "devices are not a multiple of 2.")
  return (1, 2, num_devices // 2)


def build_config(config_filename: str, overrides: dict, seconds: int | None = None):
  """The config of `--config=<file>:<arg>` plus `--config.x=...` overrides, for `seconds`.

  The duration is a config-file argument (it sets the frames, segments and text length), so
  each duration loads the file again rather than patching one config.
  """
  path, _, arg = config_filename.partition(":")
  items = [a for a in arg.split(",") if a]
  if seconds is not None:
    items = [a for a in items if not a.startswith("seconds=")] + [f"seconds={seconds}"]
  spec = importlib.util.spec_from_file_location("_compile_only_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(",".join(items))
  config.update_from_flattened_dict(dict(overrides))
  config_lib.validate(config)
  return config


def make_mesh(config, topology: Topology):
  """The config's mesh on the topology's devices, ordered for the physical interconnect."""
  devices = list(topology.devices)
  shape = list(config.sharding.mesh_shape)
  if -1 in shape:  # resolve here so create_device_mesh gets a full shape; make_mesh checks it
    rest = int(np.prod([s for s in shape if s != -1]))
    shape[shape.index(-1)] = len(devices) // rest
  try:
    devices = list(mesh_utils.create_device_mesh(shape, devices).flat)
  except (ValueError, AssertionError, NotImplementedError):
    pass  # shapes mesh_utils cannot map physically: plain device order, same validity checks
  return sharding.make_mesh(shape, devices, num_heads=config.model.num_heads,
                            model_dim=config.model.model_dim)


def abstract_model(config, mesh):
  """(graphdef, abstract parameter State whose leaves are sharded ShapeDtypeStructs)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: DiT.from_config(config, rngs=nnx.Rngs(0))))
  shardings = sharding.param_shardings(state, mesh, config.sharding.rules)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       state, shardings)
  return graphdef, state


def _replicated(mesh, tree):
  """Abstract copies of `tree`'s arrays, replicated over the mesh."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype, sharding=replicated),
                      tree)


def sample_args(config, mesh, params, num_steps: int = 50):
  """Abstract arguments of the sampler loop (`sampling.generate.sampler_fn`) for one video:
  operand (params, text_u, text_c), x_T, the step key and the DPM++(2M) SDE coefficients."""
  from ttt_jax.sampling import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  m, s = config.model, config.sequence
  text = jax.ShapeDtypeStruct((1, s.num_chunks, s.text_length, m.text_dim), jnp.float32)
  x_T = jax.ShapeDtypeStruct((1, s.num_frames, m.in_channels, m.latent_height,
                              m.latent_width), jnp.float32)
  tables = sampler_lib.make_tables("dpmpp_2m_sde", num_steps)
  coeffs = tables.device_coefficients(sampler_lib.dynamic_cfg_scales(tables.timesteps))
  key = jax.eval_shape(lambda: jax.random.key(0))
  rest = _replicated(mesh, (text, text, x_T, key, coeffs))
  return ((params, rest[0], rest[1]), *rest[2:])


def abstract_batch(config, mesh, batch: int, step: str):
  """Sharded shapes of one global batch: (video, text, timesteps) for `forward`, the train
  step's {"latents", "text"} for `train` (its noise and timesteps are drawn inside)."""
  m, s = config.model, config.sequence
  video = (batch, s.num_frames, m.in_channels, m.latent_height, m.latent_width)
  text = (batch, s.num_chunks, s.text_length, m.text_dim)
  axes, ways = sharding.batch_axes(mesh, config.sharding.rules)
  if batch % ways:
    raise sharding.MeshError(f"--batch={batch} is not divisible by the batch axes {axes} "
                             f"({ways} ways).")
  spec = lambda shape: jax.ShapeDtypeStruct(
      shape, jnp.float32, sharding=sharding.batch_sharding(mesh, config.sharding.rules,
                                                           len(shape)))
  if step == "train":
    return {"latents": spec(video), "text": spec(text)}
  return [spec(video), spec(text), spec((batch,))]


def forward_step(graphdef):
  """One denoising forward (what each sampling step runs): v = model(x_t, text, t)."""
  def forward(params, video, text, timesteps):
    return nnx.merge(graphdef, params)(video, text, timesteps)
  return forward


def per_device_bytes(state) -> int:
  """Bytes of the largest shard of every leaf of an abstract sharded State, summed."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(state))


def compile_step(config, topology: Topology, step: str, batch: int | None = None):
  """Compiles `step` for the topology; returns (compiled, abstract params, info dict).

  `compiled` is None when the compiler ran out of device memory; `info["error"]` then says how
  much the step's temporaries needed (`oom_temp_gib`) of what the device has
  (`oom_capacity_gib`), and `info["error_detail"]` is the compiler's whole message.
  """
  mesh = make_mesh(config, topology)
  rules = config.sharding.rules
  graphdef, params = abstract_model(config, mesh)
  if step == "sample":
    # The whole sampler loop (50 DPM++(2M) SDE steps under lax.scan, CFG as a batch of 2) for
    # one video, as `ttt_jax.sampling.generate` runs it.
    from ttt_jax.sampling import generate  # pylint: disable=g-import-not-at-top
    if batch not in (None, 1):
      raise sharding.MeshError(f"--batch={batch}: the sample step compiles one video.")
    generate.check_mesh(mesh, rules)
    batch = 1
    jitted = generate.sampler_fn(graphdef, mesh, generate.frozen(rules), False)
    args = sample_args(config, mesh, params)
  elif step == "forward":
    batch = batch or sharding.batch_axes(mesh, rules)[1]
    inputs = abstract_batch(config, mesh, batch, step)
    jitted, args = sharding.jit_sharded(forward_step(graphdef), mesh, rules), (params, *inputs)
  elif step == "train":
    # The training step itself (ttt_jax.train.step): v-prediction loss with noise drawn inside,
    # AdamW with upstream's groups and `train.adapter`, the donated state updated in place.
    from ttt_jax.train import step as train_lib  # pylint: disable=g-import-not-at-top
    batch = batch or sharding.batch_axes(mesh, rules)[1]
    inputs = abstract_batch(config, mesh, batch, step)
    state = train_lib.abstract_state(config, mesh, nnx.to_pure_dict(params))
    jitted, args = train_lib.jit_train_step(config, mesh, graphdef, state), (state, inputs)
  else:
    raise ValueError(f"step {step!r}: use one of {STEPS}.")
  info = dict(mesh_shape=[int(mesh.shape[a]) for a in sharding.MESH_AXES], batch=batch)
  with _abstract_mesh_for(topology.platform, mesh):
    lowered = jitted.trace(*args).lower()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # The TPU compiler refuses a program that cannot fit in HBM: report what it needed.
    info.update(_out_of_memory(str(e)))
    compiled = None
  return compiled, params, info


@contextlib.contextmanager
def _abstract_mesh_for(platform: str, mesh):
  """While tracing for a GPU topology, makes the mesh the abstract mesh: Pallas-Triton reads the
  GPU model it compiles for from there. (Kernel choices follow the mesh's platform by
  themselves, `ttt_jax.sharding.target_platform`.)"""
  if platform != "cuda":
    yield
    return
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    yield


def _out_of_memory(message: str) -> dict:
  """What the compiler's out-of-memory error says was needed (temporaries) and available."""
  units = {"K": 2 ** -20, "M": 2 ** -10, "G": 1.0, "T": 2 ** 10}
  out = dict(error=message.strip().splitlines()[0][:300], error_detail=message)
  m = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds available (\w+) "
                r"\(([\d.]+)([KMGT])\)", message)
  if m:
    out["oom_temp_gib"] = float(m.group(1)) * units[m.group(2)]
    out["oom_capacity_gib"] = float(m.group(4)) * units[m.group(5)]
    out["error"] = (f"out of {m.group(3)}: temporaries need {m.group(1)}{m.group(2)} "
                    f"of {m.group(4)}{m.group(5)}")
  return out


def memory_report(compiled) -> dict:
  """Per-device sizes from XLA's buffer assignment, in GiB; total = what the step holds at once
  (arguments + outputs not aliased to arguments + temporaries + code)."""
  m = compiled.memory_analysis()
  sizes = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
               temp=m.temp_size_in_bytes, generated_code=m.generated_code_size_in_bytes,
               alias=m.alias_size_in_bytes)
  out = {f"{k}_gib": v / GIB for k, v in sizes.items()}
  out["total_gib"] = (sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"] +
                      sizes["generated_code"]) / GIB
  peak = getattr(m, "peak_memory_in_bytes", 0)
  if peak:
    out["peak_gib"] = peak / GIB
  return out
