"""A cluster smoke job: joins the processes, builds the mesh and the sharded model, runs a few
denoising forwards on random inputs and reports the step time. Run it through the launchers
(`launch/tpu_pod.sh`, `launch/slurm_gpu.sbatch`) before a long job.

  python launch/cluster_check.py --config=configs/default.py:preset=debug,seconds=9 \
      --config.sharding.mesh_shape='(-1,1,1)' [--checkpoint=ckpt/stage0]
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from ttt_jax import config as config_lib
from ttt_jax import distributed, sharding
from ttt_jax.checkpoint import convert
from ttt_jax.nn.dit import DiT

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Model config.")
_BATCH = flags.DEFINE_integer("batch", 0, "Global batch (default: data x fsdp size).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed forwards after the first.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Optional orbax checkpoint to restore.")


def main(argv):
  del argv
  distributed.initialize()
  config = _CONFIG.value
  config_lib.validate(config)
  mesh = sharding.mesh_from_config(config)
  rules = config.sharding.rules
  batch = _BATCH.value or mesh.shape["data"] * mesh.shape["fsdp"]
  if _CHECKPOINT.value:
    model = convert.restore(_CHECKPOINT.value, config, mesh=mesh)  # straight into shardings
  else:
    model = sharding.create_sharded(lambda: DiT.from_config(config, rngs=nnx.Rngs(0)), mesh,
                                    rules)
  m, s = config.model, config.sequence
  per_host = batch // jax.process_count()
  rng = np.random.default_rng(jax.process_index())
  local = lambda *shape: rng.normal(size=(per_host, *shape)).astype(np.float32)
  inputs = [distributed.global_batch(x, mesh, rules, batch) for x in (
      local(s.num_frames, m.in_channels, m.latent_height, m.latent_width),
      local(s.num_chunks, s.text_length, m.text_dim),
      np.full((per_host,), 500.0, np.float32))]
  forward = sharding.jit_sharded(lambda model, *a: model(*a), mesh, rules)
  t0 = time.perf_counter()
  jax.block_until_ready(forward(model, *inputs))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(_STEPS.value):
    out = forward(model, *inputs)
  jax.block_until_ready(out)
  step_ms = (time.perf_counter() - t0) / max(_STEPS.value, 1) * 1e3
  finite = bool(jnp.isfinite(out).all())  # a collective: every process runs it
  if jax.process_index() == 0:
    logging.info("cluster_check: %d processes, %d devices (%s), mesh %s, batch %d, %d tokens: "
                 "first call %.1f s, forward %.1f ms, output finite: %s", jax.process_count(),
                 jax.device_count(), jax.devices()[0].device_kind, dict(mesh.shape), batch,
                 config_lib.sequence_layout(config).total_tokens, compile_s, step_ms,
                 finite)


if __name__ == "__main__":
  app.run(main)
