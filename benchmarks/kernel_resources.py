"""What the Mosaic GPU TTT kernels ask of a Hopper SM when compiled: shared memory, registers,
spills.

Each kernel is compiled in a child process with Mosaic GPU's dumps on (MOSAIC_GPU_DUMP_PTXAS,
MOSAIC_GPU_DUMP_RESOURCES), for a compile-only H100 from jax's CUDA plugin (no GPU needed) or
for this machine's GPU (--topology=local). One JSON line per kernel: shapes, the shared memory
Mosaic GPU allocates and the kernel's own estimate (`smem_bytes`), registers per thread, the
stack frame and the spill stores / loads ptxas reports (bytes of spill instructions in the
code, not traffic), and compile seconds. A static profile, not a timing: it tells whether a
change keeps a kernel within one SM's registers and shared memory before a GPU is at hand, and
it is what to compare against when tuning on one.

  python benchmarks/kernel_resources.py                      # the three cluster kernels, 5B shapes
  python benchmarks/kernel_resources.py --out=benchmarks/results/h100-resources.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

# The forward (checkpoints every g mini-batches), the backward's recompute of one group (the
# forward kernel saving every state, W1 and W2 in bf16) and the backward of one group.
KERNELS = ("cluster_forward", "cluster_recompute", "cluster_backward")


def parse_dump(text: str) -> dict:
  """Resource fields from the child's output (Mosaic GPU's resources line, ptxas's info)."""
  out = {}
  if m := re.search(r"smem_scratch_bytes=(\d+)", text):
    out["smem_bytes"] = int(m.group(1))
  if m := re.search(r"Used (\d+) registers", text):
    out["registers"] = int(m.group(1))
  if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                    text):
    out.update(stack_frame_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)),
               spill_load_bytes=int(m.group(3)))
  return out


def _compile(kernel: str, args) -> dict:
  """In the child: compile one kernel at the 5B layer's per-device shapes; its row's fields."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec, use_abstract_mesh

  from pallas_kernels.ttt import gpu_cluster, gpu_cluster_backward
  from ttt_jax import aot

  devices = jax.devices() if args.topology == "local" else aot.get_topology(args.topology).devices
  mesh = Mesh(np.array(devices[:1]), ("x",))
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(
      shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))
  B, H, b, d, P = 1, args.heads, 64, 64, args.cluster
  f, bf16, f32 = 4 * d, jnp.bfloat16, jnp.float32
  state = lambda lead, w_dtype: (spec((*lead, d, f), w_dtype), spec((*lead, 1, f), f32),
                                 spec((*lead, f, d), w_dtype), spec((*lead, 1, d), f32))
  ln = spec((H, d), f32)
  if kernel == "cluster_forward":
    N, module = args.num_mini_batches, gpu_cluster
    fn = lambda *a: gpu_cluster.forward(*a, eps=1e-6, checkpoint_group=args.checkpoint_group,
                                        cluster=P)
    shapes = (*[spec((B, H, N, b, d), bf16)] * 3, spec((B, H, N, b), f32), ln, ln,
              state((H,), f32))
  elif kernel == "cluster_recompute":  # `gpu.backward`'s first half for one group
    N, module = args.checkpoint_group, gpu_cluster
    fn = lambda *a: gpu_cluster.forward(*a, eps=1e-6, checkpoint_group=1, cluster=P,
                                        per_example_init=True, weights_dtype=bf16)
    shapes = (*[spec((B, H, N, b, d), bf16)] * 3, spec((B, H, N, b), f32), ln, ln,
              state((B, H), f32))
  else:  # one group of the reverse sweep
    N, module = args.checkpoint_group, gpu_cluster_backward
    fn = lambda *a: gpu_cluster_backward.backward_group(*a, eps=1e-6, cluster=P)
    xs = (*[spec((B, H, N, b, d), bf16)] * 3, spec((B, H, N, b), f32))
    shapes = (xs, ln, ln, state((B, H, N), bf16), spec((B, H, N, b, d), bf16),
              state((B, H), f32))
  t0 = time.perf_counter()
  with use_abstract_mesh(mesh.abstract_mesh):
    jax.jit(fn).trace(*shapes).lower().compile()
  return dict(device_kind=devices[0].device_kind, jax=jax.__version__, batch=B, heads=H,
              mini_batches=N, mini_batch=b, head_dim=d, cluster=P,
              smem_estimate_bytes=module.smem_bytes(b, d, P),
              compile_s=round(time.perf_counter() - t0, 1))


def measure(kernel: str, args) -> dict:
  """Runs the child for `kernel` with the dumps on and returns its row."""
  env = dict(os.environ, MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_RESOURCES="1")
  env.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # compile-only: no CUDA runtime needed
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
  cmd = [sys.executable, os.path.abspath(__file__), f"--child={kernel}",
         f"--topology={args.topology}", f"--heads={args.heads}", f"--cluster={args.cluster}",
         f"--num_mini_batches={args.num_mini_batches}",
         f"--checkpoint_group={args.checkpoint_group}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, errors="replace")
  if proc.returncode:
    raise SystemExit(f"compiling {kernel} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  return dict(bench="kernel_resources", kernel=kernel, topology=args.topology, **row,
              **parse_dump(proc.stdout + proc.stderr))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated of {KERNELS}")
  p.add_argument("--topology", default="h100-1",
                 help="h100-1 / h200-1 (compile-only, jax's CUDA plugin) or local (this GPU)")
  p.add_argument("--heads", type=int, default=12, help="heads per device (5B: 48 / tensor)")
  p.add_argument("--cluster", type=int, default=4)
  p.add_argument("--num_mini_batches", type=int, default=32)
  p.add_argument("--checkpoint_group", type=int, default=16)
  p.add_argument("--out", default=None, help="append the JSON lines to this file too")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(_compile(args.child, args)))
    return
  out = open(args.out, "a") if args.out else None
  for kernel in args.kernels.split(","):
    if kernel not in KERNELS:
      raise SystemExit(f"--kernels: {kernel!r} is not one of {KERNELS}")
    line = json.dumps(measure(kernel, args))
    print(line, flush=True)
    if out:
      out.write(line + "\n")


if __name__ == "__main__":
  main()
