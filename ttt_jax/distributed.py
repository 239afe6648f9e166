"""Multi-host start-up and per-host data into global arrays.

`initialize()` joins this process to a multi-process JAX job, from (first match):
  1. explicit arguments, or the environment TTT_JAX_COORDINATOR=host:port,
     TTT_JAX_NUM_PROCESSES, TTT_JAX_PROCESS_ID (any launcher, e.g. the tests);
  2. a TPU pod (every worker runs the same command; jax reads the TPU metadata);
  3. SLURM (`srun`, one task per node or per GPU; jax reads SLURM_* for the coordinator);
and does nothing for a single process. Each host then feeds only its share of every batch
(`global_batch`), so no host ever holds the global batch.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from ttt_jax import sharding


def _env_int(name):
  value = os.environ.get(name)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError as e:
    raise ValueError(f"environment variable {name}={value!r} must be an integer.") from e


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts jax.distributed if this is a multi-process job; returns True if it did."""
  coordinator_address = coordinator_address or os.environ.get("TTT_JAX_COORDINATOR")
  num_processes = num_processes if num_processes is not None else _env_int(
      "TTT_JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("TTT_JAX_PROCESS_ID")
  if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
    # CPU collectives across processes need gloo (tests and CPU clusters).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address:
    missing = [n for n, v in (("num_processes / TTT_JAX_NUM_PROCESSES", num_processes),
                              ("process_id / TTT_JAX_PROCESS_ID", process_id)) if v is None]
    if missing:
      raise ValueError(f"coordinator {coordinator_address} given but {', '.join(missing)} "
                       "missing; set all three.")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  on_tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ or "CLOUD_TPU_TASK_ID" in os.environ
  on_slurm = (_env_int("SLURM_NTASKS") or 1) > 1
  if on_tpu_pod or on_slurm:
    jax.distributed.initialize()  # jax's own cluster detection (TPU metadata, SLURM_*)
    return True
  return False


def global_batch(local, mesh, rules, global_batch_size: int):
  """This host's rows of a batch -> one global array, batch-sharded over the mesh.

  `local` holds rows [i*b, (i+1)*b) of the global batch for process i (b = global size /
  process count), the order of the mesh's batch shards across hosts.
  """
  spec = sharding.batch_sharding(mesh, rules, np.ndim(local))
  per_host = global_batch_size // jax.process_count()
  if global_batch_size % jax.process_count() or np.shape(local)[0] != per_host:
    raise ValueError(f"process {jax.process_index()} gave {np.shape(local)[0]} rows; with "
                     f"global batch {global_batch_size} over {jax.process_count()} processes "
                     f"each must give {global_batch_size / jax.process_count():g}.")
  return jax.make_array_from_process_local_data(
      spec, local, (global_batch_size,) + tuple(np.shape(local)[1:]))
