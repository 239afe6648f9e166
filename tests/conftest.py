"""Shared test set-up: eight CPU devices, and the PyTorch parity oracle in its own venv.

torch 2.13.0's CPU wheel on these machines is for Python 3.11 while jax >= 0.11 needs 3.12, so
the oracle lives in `.venv-oracle` (made by `bash install.sh --oracle`) and the tests talk to it
through files: a script under `tests/torch_oracle/` writes safetensors / npz / torch files that
the test then reads. Without the oracle venv these tests fail with the command that fixes it;
`TTT_JAX_ORACLE=skip` skips them instead (for machines with no Python 3.11).
"""

import os
import pathlib
import subprocess

# Eight host CPU devices for the sharding tests; set before anything imports jax. Single-device
# code runs on device 0 as before (measured: no slowdown).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).parents[1]
ORACLE_PYTHON = pathlib.Path(os.environ.get("TTT_JAX_ORACLE_PYTHON",
                                            ROOT / ".venv-oracle" / "bin" / "python"))


@pytest.fixture(scope="session")
def run_oracle():
  """run_oracle(script_name, *args): runs tests/torch_oracle/<script_name> under torch."""
  if not ORACLE_PYTHON.exists():
    message = (f"PyTorch oracle not found at {ORACLE_PYTHON}: run `bash install.sh --oracle` "
               "(or set TTT_JAX_ORACLE_PYTHON, or TTT_JAX_ORACLE=skip to skip parity tests).")
    if os.environ.get("TTT_JAX_ORACLE") == "skip":
      pytest.skip(message)
    pytest.fail(message)

  def run(script: str, *args, timeout: float = 600) -> str:
    cmd = [str(ORACLE_PYTHON), str(ROOT / "tests" / "torch_oracle" / script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
      raise RuntimeError(f"oracle script {script} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout

  return run
