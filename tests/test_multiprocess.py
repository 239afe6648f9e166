"""Two processes on localhost, joined by jax.distributed, 4 CPU devices each, run a sharded
forward and gradient step; they agree with the single-process result."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from tests.conftest import ROOT
from tests.oracles import rel_err
from tests.test_sharding import _make, _setup, _sgd_step


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
  out = tmp_path / "out.npz"
  coordinator = f"localhost:{_free_port()}"
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "multiprocess_worker.py"),
                             coordinator, "2", str(i), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for i in range(2)]
  try:
    results = [p.communicate(timeout=600) for p in procs]
  finally:
    for p in procs:  # never leave a worker behind, whatever happened
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]

  config, inputs = _setup(variant="ttt_linear", seconds=9)
  model = _make(config)()
  ref = jax.jit(lambda m, *a: m(*a))(model, *inputs)
  ref_loss, _ = jax.jit(_sgd_step)(model, *inputs)
  got = np.load(out)
  assert rel_err(got["out"], ref) <= 1e-5
  assert rel_err(got["loss"], ref_loss) <= 1e-5


def test_cluster_check_runs_across_two_processes_from_the_environment():
  """The launchers' path: jax.distributed configured by TTT_JAX_* variables only."""
  coordinator = f"localhost:{_free_port()}"
  procs = []
  for i in range(2):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "TTT_JAX_COORDINATOR": coordinator,
           "TTT_JAX_NUM_PROCESSES": "2", "TTT_JAX_PROCESS_ID": str(i)}
    procs.append(subprocess.Popen(
        [sys.executable, str(ROOT / "launch" / "cluster_check.py"),
         f"--config={ROOT / 'configs' / 'default.py'}:seconds=3,variant=ttt_linear",
         "--config.sharding.mesh_shape=(2,2,2)", "--steps=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
  try:
    results = [p.communicate(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
  log = results[0][1]
  assert "2 processes, 8 devices" in log and "output finite: True" in log, log[-2000:]
