"""Shared by the benchmark scripts: timing, the device's measured matmul rate, output rows.

Every script prints one JSON line per measurement on stdout (optionally appended to --out) and
a human table on stderr.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax


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
