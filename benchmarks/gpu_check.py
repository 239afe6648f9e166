"""The GPU TTT kernels, compiled for this machine, against the pure op: run it first on a GPU.

For each kernel path (`cluster`: the Mosaic GPU forward and backward; `cluster-g1`: the same
at checkpoint_group 1, every state stored and no recompute; `cluster8`: both on 8 CTAs a
head, W2 held transposed; `cluster-wg2`: the forward on two warpgroups a CTA, which share
the input buffers and meet at the cluster barriers, the backward as `cluster`'s; `triton`:
the Triton forward with the XLA reverse sweep, as at d = 64; `triton-d32`: Triton forward
and backward) it draws fresh random inputs, runs the op's output and its gradients, and
compares them with `ttt_jax.ops.ttt_mlp` (the XLA scan) in
float32 at the highest matmul precision on the same bf16-rounded inputs, by ||x - ref|| /
||ref||. Each path runs on two independent input sets, and the first set twice: the kernels
are deterministic, so a result that moves between identical runs points at a race (a missing
barrier or fence), not rounding. NaN never passes. One JSON line per (path, input set,
quantity) on stdout, a table on stderr; exit status 1 if any check fails. On a CPU the
kernels run interpreted (use small --heads / --num_mini_batches).

  python benchmarks/gpu_check.py                        # 5B per-GPU shapes (12 heads, B = 2)
  python benchmarks/gpu_check.py --heads=1 --num_mini_batches=3 --batch=1 --paths=triton-d32
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bench_util import Emitter, device_fields
from pallas_kernels.ttt import BlockSizes
from pallas_kernels.ttt import op as pallas_op
from ttt_jax import ops

# path: (head_dim, block sizes, checkpoint group or None for --checkpoint_group)
PATHS = {"cluster": (64, BlockSizes(cluster=4), None),
         "cluster-g1": (64, BlockSizes(cluster=4), 1),
         "cluster8": (64, BlockSizes(cluster=8), None),
         "cluster-wg2": (64, BlockSizes(cluster=4, warpgroups=2), None),
         "triton": (64, BlockSizes(num_warps=8), None),
         "triton-d32": (32, BlockSizes(num_warps=4), None)}
TOL = 2e-2  # bf16 operands against an f32 reference (measured 3e-3 to 8e-3 in the interpreter)
NAMES = ("out", "xq", "xk", "xv", "eta", "ln_weight", "ln_bias", "W1", "b1", "W2", "b2")


def inputs(seed, B, H, N, b, d):
  """Random TTT-MLP inputs: bf16 activations, f32 parameters; eta small, as in the model. The
  biases and LayerNorm parameters are random too (not `ttt_op.make_inputs`'s initialisation:
  zeros and ones would hide a wrong index)."""
  ks = jax.random.split(jax.random.key(seed), 11)
  n = lambda k, shape, scale=1.0: scale * jax.random.normal(k, shape, jnp.float32)
  f = 4 * d
  xs = [n(ks[i], (B, H, N, b, d)).astype(jnp.bfloat16) for i in range(3)]
  eta = jnp.abs(n(ks[3], (B, H, N, b), 0.02))
  params = [1 + n(ks[4], (H, d), 0.1), n(ks[5], (H, d), 0.1), n(ks[6], (H, d, f), 0.05),
            n(ks[7], (H, 1, f), 0.02), n(ks[8], (H, f, d), 0.05), n(ks[9], (H, 1, d), 0.02)]
  cot = n(ks[10], (B, H, N, b, d))
  return (*xs, eta, *params), cot


def out_and_grads(op, args, cot):
  """The op's output (f32) and the gradients of <out, cot> with respect to every argument."""
  def loss(*a):
    out = op(*a).astype(jnp.float32)
    return jnp.sum(out * cot), out
  grads, out = jax.grad(loss, argnums=tuple(range(len(args))), has_aux=True)(*args)
  return (out, *grads)


def check_path(name, args_by_seed, cots, checkpoint_group, emit):
  d, sizes, group = PATHS[name]
  checkpoint_group = group or checkpoint_group  # (the reference remats at the same group)
  kernel = jax.jit(functools.partial(
      out_and_grads, functools.partial(pallas_op.ttt_mlp, checkpoint_group=checkpoint_group,
                                       backend="gpu", block_sizes=sizes)))
  f32 = lambda a: tuple(x.astype(jnp.float32) for x in a)
  ref = jax.jit(functools.partial(
      out_and_grads, functools.partial(ops.ttt_mlp, checkpoint_group=checkpoint_group,
                                       impl="xla")))
  ok = True
  for s, (args, cot) in enumerate(zip(args_by_seed, cots)):
    got = jax.device_get(kernel(args, cot))  # traced at the default precision, as it runs
    with jax.default_matmul_precision("highest"):  # (read when the reference is traced)
      want = jax.device_get(ref(f32(args), cot))
    again = jax.device_get(kernel(args, cot)) if s == 0 else got
    for q, g, w, a in zip(NAMES, got, want, again):
      g, w, a = (np.asarray(x, np.float64) for x in (g, w, a))
      err = float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30))
      moved = float(np.max(np.abs(g - a)))
      passed = bool(np.isfinite(g).all() and err <= TOL and moved == 0.0)
      ok &= passed
      emit(dict(device_fields("gpu_check"), path=name, inputs=s, quantity=q,
                shape=list(args[0].shape), rel_err=err, rerun_max_abs_diff=moved,
                tolerance=TOL, passed=passed))
  return ok


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated of {tuple(PATHS)}")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--num_mini_batches", type=int, default=40)
  p.add_argument("--checkpoint_group", type=int, default=16)
  p.add_argument("--out", default=None, help="append the JSON lines to this file too")
  args = p.parse_args(argv)
  emit = Emitter(args.out, ("path", "inputs", "quantity", "rel_err", "rerun_max_abs_diff",
                            "passed"))
  ok = True
  for name in args.paths.split(","):
    if name not in PATHS:
      raise SystemExit(f"--paths: {name!r} is not one of {tuple(PATHS)}")
    d = PATHS[name][0]
    pairs = [inputs(seed, args.batch, args.heads, args.num_mini_batches, 64, d)
             for seed in (0, 1)]
    ok &= check_path(name, [a for a, _ in pairs], [c for _, c in pairs], args.checkpoint_group,
                     emit)
  emit.close()
  print("all passed" if ok else "FAILED", file=sys.stderr)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
