"""TTT-MLP scan: the Pallas kernel (`impl=pallas`) against the XLA scan (`impl=xla`), forward
and forward + backward, at the 5B model's per-layer shapes (48 heads, d = 64, b = 64) for the
sequence of each video duration, side by side in one run.

One JSON line per (seconds, dtype, mode, impl, checkpoint group): device, jax version, shapes,
median ms, achieved TFLOP/s by the dual-form FLOP count (`ttt_jax.ops.ttt_flops`, fwd+bwd = 3x
fwd; the cluster forward computes the primal form, 26% fewer FLOPs, so its figure is the pure
op's work per second, not its tensor-core use) and % of the bf16/f32 matmul rate measured in the
same run; the pallas rows add the speed-up over xla. On a CPU the kernel runs in interpret mode,
so only the numerics and the plumbing mean anything; run it on the accelerator (device tool
METHOD.md) and commit the JSON under benchmarks/results/.

  python benchmarks/ttt_kernels.py --seconds=3,9,18,63 --out=benchmarks/results/h100.jsonl
  python benchmarks/ttt_kernels.py --backend=gpu --gpu_cluster=4,0   # cluster vs Triton kernels
  python benchmarks/ttt_kernels.py --heads=12 --gpu_cluster=4,8     # one wave either way
  python benchmarks/ttt_kernels.py --tpu_mini_batches_per_step=8,1   # TPU forward grid steps
  python benchmarks/ttt_kernels.py --checkpoint_group=16,1 --impls=xla,pallas  # + stored states
  python benchmarks/ttt_kernels.py --heads=2 --seconds=3 --repeats=1      # CPU smoke run
  python benchmarks/summarize.py benchmarks/results/*.jsonl --svg=summary.svg  # across devices
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp

from bench_util import Emitter, default_matmul_size, device_fields, matmul_rate, time_fn
from configs.default import get_config
from pallas_kernels.ttt import get_block_sizes, gpu
from pallas_kernels.ttt import gpu_cluster as gpu_cluster_kernel
from pallas_kernels.ttt import op as pallas_op
from ttt_jax import config as config_lib
from ttt_jax import ops, sharding
from ttt_op import make_inputs


def build(impl, mode, checkpoint_group, backend=None, block_sizes=None):
  if impl.startswith("pallas"):  # the kernel op itself, to pick the kernel family
    fwd = functools.partial(pallas_op.ttt_mlp, checkpoint_group=checkpoint_group,
                            backend=backend, block_sizes=block_sizes)
  else:
    fwd = functools.partial(ops.ttt_mlp, checkpoint_group=checkpoint_group, impl=impl)
  if mode == "fwd":
    return jax.jit(fwd)
  loss = lambda *a: jnp.sum(fwd(*a).astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=tuple(range(10))))


def variants(impls, gpu_cluster, tpu_steps, dtype, d, gpu_warpgroups=(1,)):
  """(impl label, block sizes or None) to time: "pallas" expands to one row per --gpu_cluster
  value ("pallas-cluster4", "pallas-cluster8", "pallas-triton"), and per --gpu_warpgroups
  value > 1 where the cluster forward takes it ("pallas-cluster4-wg2"), and per
  --tpu_mini_batches_per_step value ("pallas-k8") when given, else it is the tuning table's
  choice. A --gpu_cluster value is the split of forward and backward, whatever the grid."""
  for impl in impls:
    if impl != "pallas" or not (gpu_cluster or tpu_steps):
      yield impl, None
      continue
    table = get_block_sizes(sharding.target_device()[1], jnp.dtype(dtype), d)
    for P in gpu_cluster or ():
      yield ((f"pallas-cluster{P}" if P else "pallas-triton"),
             dataclasses.replace(table, cluster=P, wave_cluster=0, warpgroups=1))
      for W in gpu_warpgroups:
        if W > 1 and P and gpu_cluster_kernel.supports("ttt_mlp", dtype, 64, d, P, W):
          yield (f"pallas-cluster{P}-wg{W}",
                 dataclasses.replace(table, cluster=P, wave_cluster=0, warpgroups=W))
    for k in tpu_steps or ():
      yield f"pallas-k{k}", dataclasses.replace(table, mini_batches_per_step=k)


def cluster_size(impl, backend, xq, sizes):
  """CTAs per head of the GPU cluster kernels this row ran (0: Triton; None: not on a GPU
  kernel): `gpu.cluster_size` for the table's or the row's block sizes."""
  if impl == "xla" or backend != "gpu":
    return None
  sizes = sizes or get_block_sizes(sharding.target_device()[1], xq.dtype, xq.shape[-1])
  return gpu.cluster_size("ttt_mlp", xq.dtype, xq.shape, sizes)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  csv = lambda t: lambda s: [t(v) for v in s.split(",")]
  p.add_argument("--seconds", type=csv(int), default=[3, 9, 18, 63])
  p.add_argument("--dtypes", type=csv(str), default=["bfloat16"])
  p.add_argument("--modes", type=csv(str), default=["fwd", "fwd_bwd"])
  p.add_argument("--impls", type=csv(str), default=["xla", "pallas"])
  p.add_argument("--backend", choices=["tpu", "gpu"], default=None,
                 help="Pallas kernel family (default: the device's; on CPU tpu, interpreted)")
  p.add_argument("--gpu_cluster", type=csv(int), default=None,
                 help="GPU: one pallas row per value, CTAs per head for the Mosaic GPU cluster "
                      "kernels, forward and backward (0: the Triton kernels); default: the "
                      "tuning table's")
  p.add_argument("--gpu_warpgroups", type=csv(int), default=[1],
                 help="GPU: also a pallas row per --gpu_cluster value and value here > 1, the "
                      "cluster forward on that many warpgroups a CTA (where it takes it)")
  p.add_argument("--tpu_mini_batches_per_step", type=csv(int), default=None,
                 help="TPU: one pallas row per value, mini-batches per forward grid step "
                      "(rounded to divide --checkpoint_group); default: the tuning table's")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=48)
  p.add_argument("--checkpoint_group", type=csv(int), default=[16],
                 help="one set of pallas rows per value (1 on the GPU cluster kernels: every "
                      "state stored, no recompute); the XLA scan is timed at the first only")
  p.add_argument("--num_mini_batches", type=int, default=None,
                 help="override the duration's N (smoke runs)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--matmul_size", type=int, default=None)
  p.add_argument("--out", default=None, help="also append the JSON lines to this file")
  args = p.parse_args(argv)

  b, d = 64, 64
  peak = {dt: matmul_rate(jnp.dtype(dt), args.matmul_size or default_matmul_size(),
                          args.repeats) for dt in args.dtypes}
  emit = Emitter(args.out, ("seconds", "tokens", "dtype", "mode", "impl", "median_ms",
                            "tflops_per_s", "pct_of_matmul_rate", "speedup_vs_xla"))
  family = args.backend or pallas_op.default_backend()
  kernel_backend = family + (" (interpret)" if sharding.target_platform() == "cpu" else "")
  for seconds in args.seconds:
    layout = config_lib.sequence_layout(get_config(f"preset=5b,seconds={seconds}"))
    N = args.num_mini_batches or layout.num_mini_batches(b)
    for dtype in args.dtypes:
      inputs = make_inputs("ttt_mlp", args.batch, args.heads, N, b, d, jnp.dtype(dtype))
      for mode in args.modes:
        flops = ops.ttt_flops("ttt_mlp", args.batch, args.heads, N, b, d) * (
            3 if mode == "fwd_bwd" else 1)
        times = {}
        for group, (impl, sizes) in itertools.product(
            args.checkpoint_group, variants(args.impls, args.gpu_cluster,
                                            args.tpu_mini_batches_per_step, dtype, d,
                                            args.gpu_warpgroups)):
          if impl == "xla" and group != args.checkpoint_group[0]:
            continue
          ms = time_fn(build(impl, mode, group, args.backend, sizes), inputs, args.repeats)
          times.setdefault(impl, ms)
          tflops = flops / ms / 1e9
          row = dict(device_fields("ttt_kernels"), seconds=seconds, tokens=N * b,
                     batch=args.batch, heads=args.heads, num_mini_batches=N, mini_batch=b,
                     head_dim=d, checkpoint_group=group, dtype=dtype, mode=mode,
                     impl=impl, kernel_backend=None if impl == "xla" else kernel_backend,
                     gpu_cluster=cluster_size(impl, family, inputs[0], sizes),
                     gpu_warpgroups=None if sizes is None else sizes.warpgroups,
                     mini_batches_per_step=None if sizes is None else sizes.mini_batches_per_step,
                     median_ms=round(ms, 3), flops=flops,
                     tflops_per_s=round(tflops, 4),
                     matmul_tflops_per_s=round(peak[dtype] / 1e3, 4),
                     pct_of_matmul_rate=round(100 * tflops * 1e3 / peak[dtype], 2))
          if impl != "xla" and "xla" in times:
            row["speedup_vs_xla"] = round(times["xla"] / ms, 4)
          emit(row)
  emit.close()


if __name__ == "__main__":
  main()
