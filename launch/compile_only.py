"""Compiles the DiT's steps for a topology from shapes only and prints per-device memory.

  python launch/compile_only.py --topology=v5p-256 \
      --config=configs/default.py:preset=5b --config.model.dtype=bfloat16 \
      --config.model.attention_backend=pallas_tpu --seconds=3,9,18,30,63 --steps=forward,train

No parameter is materialised (`nnx.eval_shape` + sharded `jax.ShapeDtypeStruct`s, see
`ttt_jax.aot`). One JSON line per (topology, seconds, step) on stdout (and appended to --out):
argument / output / temp / generated-code / alias sizes from `compiled.memory_analysis()` and
their per-device total (arguments + outputs - aliased + temporaries + code) in GiB, XLA's
heap-simulator `peak_gib` where the backend reports one, the parameter shard `params_gib`,
compile seconds and, for `train`, the adapter (its frozen parameters get no gradients and no
AdamW moments). A step the compiler
rejects for memory gets `error` (and `oom_temp_gib`) instead of sizes, the compiler's message on
stderr, and the run goes on. A table goes to stderr.

Steps: `forward` is one denoising forward (each sampling step); `train` is the training step of
`ttt_jax.train.step` (v-prediction loss, gradients, AdamW with upstream's parameter groups and
`train.adapter`, the state donated), at the config's stage recipe; `sample` is the whole
sampler loop of `ttt_jax.sampling.generate` for one video (50 DPM++(2M) SDE steps, CFG as a
batch of 2), on mesh 1x2x(D/2) (the CFG pair over fsdp, the rest tensor-parallel: e.g. one
8-GPU host or a v5p-16) unless --config.sharding.mesh_shape is given.

Topologies: `cpu-N` (N host devices, always available: a CPU simulation whose buffer sizes
follow the same sharding but whose fusion and layout decisions are the CPU compiler's),
TPU slices `v5p-256`, `v5e-64`, `v6e-16`, `v5p:4x4x8` (compile-only devices from libtpu:
`pip install -e '.[tpu]'`, no TPU needed), GPU clusters `h100-8x32`, `h200-8` (GPUs per host x
hosts; compile-only CUDA devices from jax's CUDA plugin, `pip install -e '.[cuda]'`, no GPU
needed). A topology whose plugin is missing fails with the install command, not a traceback.

Mesh: --config.sharding.mesh_shape if given, else (1, D / tensor, tensor) with --tensor (default
`aot.default_tensor`: 1 up to 9 s, 4 from 18 s on). --batch defaults to data * fsdp devices.
Rules: the config's `sharding.rules` (see `ttt_jax.sharding`). Kernels are chosen for the
topology's platform (`ttt_jax.sharding.target_platform`): splash attention and cuDNN run per
shard under a `shard_map`.
"""

import copy
import json
import os
import re
import sys
import time

from absl import app, flags

_TOPOLOGY = flags.DEFINE_string("topology", "cpu-8", "cpu-N, v5p-256, v5e-64, v5p:4x4x8, ...")
_SECONDS = flags.DEFINE_list("seconds", None, "Durations to compile (default: the config's).")
_STEPS = flags.DEFINE_list("steps", ["forward", "train"],
                           "forward, train and/or sample (the 50-step sampler loop for one "
                           "video; mesh 1x2x(D/2) unless --config.sharding.mesh_shape).")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch (default: data * fsdp devices).")
_TENSOR = flags.DEFINE_integer("tensor", None, "Tensor-parallel size (default: 1 up to 9 s, "
                               "else 4); ignored when --config.sharding.mesh_shape is given.")
_OUT = flags.DEFINE_string("out", None, "Append the JSON lines to this file too.")


def _set_environment(argv):
  """What jax and its plugins read once, at start-up: set before jax is imported."""
  given = re.findall(r"--topology[= ](\S+)", " ".join(argv))
  topology = given[-1] if given else _TOPOLOGY.default  # absl: the last one wins
  if m := re.fullmatch(r"cpu-(\d+)", topology):  # cpu-N: N host devices
    flag = f"--xla_force_host_platform_device_count={m.group(1)}"
    os.environ["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                     os.environ.get("XLA_FLAGS", "")) + " " + flag
  if re.fullmatch(r"h\d+-.*", topology):
    # The CUDA plugin refuses to load when it cannot find the CUDA runtime libraries it would
    # run with; compiling needs none of them (cuDNN only for attention_backend=cudnn).
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  # Compile-only TPU devices use no chip, so several runs (and tests) may load libtpu at once;
  # without this libtpu takes a host-wide lockfile and every second process fails.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


_set_environment(sys.argv)

import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from ttt_jax import aot  # noqa: E402
from ttt_jax.config import ConfigError  # noqa: E402
from ttt_jax.sharding import MeshError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Model config.")

_COLUMNS = ("topology", "seconds", "step", "mesh_shape", "batch", "argument_gib", "output_gib",
            "temp_gib", "alias_gib", "total_gib", "adapter", "compile_s",
            "error")


def _row(record):
  out = []
  for c in _COLUMNS:
    v = record.get(c, "")
    out.append(f"{v:.3g}" if isinstance(v, float) else "x".join(map(str, v))
               if isinstance(v, list) else str(v))
  return out


def main(argv):
  del argv
  holder = flags.FLAGS["config"]
  filename = config_flags.get_config_filename(holder)
  overrides = config_flags.get_override_values(holder)
  seconds = [int(s) for s in _SECONDS.value] if _SECONDS.value else [None]
  try:
    topology = aot.get_topology(_TOPOLOGY.value)
  except aot.TopologyError as e:
    sys.exit(f"compile_only: {e}")
  table = [_COLUMNS]
  for sec in seconds:
    try:
      config = aot.build_config(filename, overrides, sec)
      if "sharding.mesh_shape" not in overrides:
        tensor = _TENSOR.value or aot.default_tensor(config.seconds)
        config.sharding.mesh_shape = aot.default_mesh_shape(topology.num_devices, tensor)
    except (ConfigError, MeshError) as e:
      sys.exit(f"compile_only: {e}")
    for step in _STEPS.value:
      start = time.perf_counter()
      step_config = config
      try:
        if step == "sample" and "sharding.mesh_shape" not in overrides:
          step_config = copy.deepcopy(config)
          step_config.sharding.mesh_shape = aot.sample_mesh_shape(topology.num_devices)
        compiled, params, info = aot.compile_step(step_config, topology, step,
                                                  None if step == "sample" else _BATCH.value)
      except (MeshError, ValueError) as e:
        sys.exit(f"compile_only: {e}")
      detail = info.pop("error_detail", None)
      if detail:  # the compiler's list of the largest buffers: the place to start cutting
        print(f"compile_only: {topology.name} {config.seconds} s {step}: {detail}", file=sys.stderr)
      record = dict(topology=topology.name, platform=topology.platform,
                    device_kind=topology.devices[0].device_kind, preset=config.preset,
                    seconds=config.seconds, step=step, variant=config.model.variant,
                    dtype=config.model.dtype, remat_policy=config.model.remat_policy,
                    attention_backend=config.model.attention_backend, **info,
                    compile_s=round(time.perf_counter() - start, 1),
                    params_gib=aot.per_device_bytes(params) / aot.GIB,
                    **(aot.memory_report(compiled) if compiled else {}), jax=jax.__version__)
      if step == "train":
        record["adapter"] = config.train.adapter
      line = json.dumps(record)
      print(line, flush=True)
      if _OUT.value:
        with open(_OUT.value, "a") as f:
          f.write(line + "\n")
      table.append(_row(record))
  widths = [max(len(r[i]) for r in table) for i in range(len(_COLUMNS))]
  for r in table:
    print("  ".join(v.rjust(w) for v, w in zip(r, widths)), file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
