"""One process of the two-process test (tests/test_multiprocess.py); not a test itself.

  python multiprocess_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID OUT.npz

4 CPU devices per process; the (2, 2, 2) mesh spans both. Each process feeds its half of the
batch; process 0 writes the gathered output and loss.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from tests.test_sharding import _make, _setup, _sgd_step  # noqa: E402
from ttt_jax import distributed, sharding  # noqa: E402

coordinator, num_processes, process_id, out = sys.argv[1:]
distributed.initialize(coordinator, int(num_processes), int(process_id))
assert jax.device_count() == 8 and jax.local_device_count() == 4

config, inputs = _setup(variant="ttt_linear", seconds=9)
config.sharding.mesh_shape = (2, 2, 2)
mesh = sharding.mesh_from_config(config)
rules = config.sharding.rules
model = sharding.create_sharded(_make(config), mesh, rules)
per_host = len(inputs[0]) // jax.process_count()
rows = slice(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)
batch = [distributed.global_batch(x[rows], mesh, rules, len(x)) for x in inputs]
out_array = sharding.jit_sharded(lambda m, *a: m(*a), mesh, rules)(model, *batch)
loss, _ = sharding.jit_sharded(_sgd_step, mesh, rules)(model, *batch)
full = multihost_utils.process_allgather(out_array, tiled=True)
if jax.process_index() == 0:
  np.savez(out, out=np.asarray(full), loss=np.asarray(loss))
jax.distributed.shutdown()
