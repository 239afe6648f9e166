"""Shared by the benchmark scripts: timing, the device's measured matmul rate, output rows.

Every script prints one JSON line per measurement on stdout (optionally appended to --out) and
a human table on stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax


def compile_in_child(script: str, argv: list[str], dump_env, what: str, keep):
  """Runs benchmark `script` again as a child (`argv`: its --child mode) with this repository
  on its PYTHONPATH and `dump_env(dump_dir)` added to its environment, dump_dir a fresh
  temporary folder (compilers read their dump settings once, at start-up: one process per
  kernel). Returns the child's last stdout line as JSON, its stdout + stderr, and the text of
  the dump files whose names `keep` accepts, by name. The folder goes either way; a failed
  child is a SystemExit naming `what`."""
  dump_dir = tempfile.mkdtemp(prefix=os.path.basename(script).removesuffix(".py") + "_")
  env = dict(os.environ, **dump_env(dump_dir))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
  try:
    proc = subprocess.run([sys.executable, os.path.abspath(script), *argv], capture_output=True,
                          text=True, env=env, errors="replace")
    if proc.returncode:
      raise SystemExit(f"{what} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    dumps = {name: open(os.path.join(dump_dir, name), errors="replace").read()
             for name in os.listdir(dump_dir) if keep(name)}
  finally:
    shutil.rmtree(dump_dir, ignore_errors=True)
  return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout + proc.stderr, dumps


def time_fn(fn, args, repeats):
  """Median wall milliseconds of `fn(*args)` after one compile-and-run call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def matmul_rate(dtype, n, repeats):
  """Measured GFLOP/s of one n x n x n matmul: this device's reference rate for `dtype`."""
  a = jax.random.normal(jax.random.key(1), (n, n), dtype)
  ms = time_fn(jax.jit(lambda a: a @ a), (a,), repeats)
  return 2 * n**3 / ms / 1e6


def device_fields(bench: str) -> dict:
  dev = jax.devices()[0]
  return dict(bench=bench, device_kind=dev.device_kind, platform=dev.platform,
              jax=jax.__version__)


def default_matmul_size() -> int:
  return 1024 if jax.devices()[0].platform == "cpu" else 8192


class Emitter:
  """Prints rows as JSON lines (stdout and --out), then a table of `cols` on stderr."""

  def __init__(self, out_path: str | None, cols: tuple[str, ...]):
    self.out = open(out_path, "a") if out_path else None
    self.cols, self.rows = cols, []

  def __call__(self, row: dict):
    self.rows.append(row)
    line = json.dumps(row)
    print(line, flush=True)
    if self.out:
      self.out.write(line + "\n")
      self.out.flush()

  def close(self):
    if self.out:
      self.out.close()
    print("\n" + " | ".join(self.cols), file=sys.stderr)
    for r in self.rows:
      print(" | ".join(str(r.get(c, "")) for c in self.cols), file=sys.stderr)
