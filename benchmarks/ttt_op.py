"""Times the TTT ops (`ttt_jax.ops.ttt_mlp` / `ttt_linear`) and a per-token loop form.

For every (kind, dtype, N, mode) it prints one JSON line: device, jax version, shapes, dtype,
median milliseconds, achieved GFLOP/s by the dual-form FLOP count (`ttt_jax.ops.ttt_flops`;
fwd+bwd counts 3x the forward, the usual model-FLOPs convention, remat recompute not counted)
and the percentage of this device's matmul rate, measured in the same run with one large
matmul of the same dtype. The per-token form -- each key token's gradient taken and applied
one token at a time with `jax.grad`, each query evaluated on its own -- runs on the same inputs,
is checked against the op, and gives the dual form's speed-up as a ratio measured side by side.

  python benchmarks/ttt_op.py                          # d=64, 4d=256, b=64, N in 4,16,64
  python benchmarks/ttt_op.py --num_mini_batches=256 --heads=8 --dtypes=bfloat16 --out=r.jsonl
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from bench_util import Emitter, default_matmul_size, device_fields, matmul_rate, time_fn
from ttt_jax import ops

OPS = {"ttt_mlp": ops.ttt_mlp, "ttt_linear": ops.ttt_linear}


def per_token_ttt(kind, xq, xk, xv, eta, ln_weight, ln_bias, *weights, eps=1e-6):
  """Same semantics as the op, one token at a time: sum of per-token gradients, then W'."""
  ln = lambda z, g, b: g * (z - z.mean(-1)) * jax.lax.rsqrt(z.var(-1) + eps) + b

  def f(W, x):  # one token x: [d]
    if kind == "ttt_mlp":
      return jax.nn.gelu(x @ W[0] + W[1][0], approximate=True) @ W[2] + W[3][0]
    return x @ W[0] + W[1][0]

  def head(xq, xk, xv, eta, g, b, *W):  # [N, b, d] per (example, head)
    token_loss = lambda W, k, v, e: 0.5 * e * jnp.sum(jnp.square(ln(f(W, k), g, b) - (v - k)))

    def mini_batch(W, inputs):
      q, k, v, e = inputs

      def add_token_grad(acc, kve):
        return jax.tree.map(jnp.add, acc, jax.grad(token_loss)(W, *kve)), None

      zeros = jax.tree.map(jnp.zeros_like, W)
      grad, _ = jax.lax.scan(add_token_grad, zeros, (k, v, e))
      W = jax.tree.map(jnp.subtract, W, grad)
      out = jax.lax.map(lambda qi: qi + ln(f(W, qi), g, b), q)
      return W, out

    return jax.lax.scan(mini_batch, tuple(W), (xq, xk, xv, eta))[1]

  dtype = jnp.promote_types(xq.dtype, jnp.float32)
  up = lambda x: x.astype(dtype)
  per_head = jax.vmap(head, in_axes=(0,) * (6 + len(weights)))
  out = jax.vmap(per_head, in_axes=(0,) * 4 + (None,) * (2 + len(weights)))(
      *map(up, (xq, xk, xv, eta, ln_weight, ln_bias)), *map(up, weights))
  return out.astype(xq.dtype)


def make_inputs(kind, B, H, N, b, d, dtype, seed=0):
  """Unit-norm queries/keys as the TTT layer feeds them, step sizes near upstream's init."""
  k = jax.random.split(jax.random.key(seed), 8)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  xq, xk = (unit(jax.random.normal(k[i], (B, H, N, b, d))) for i in (0, 1))
  xv = xk + jax.random.normal(k[2], (B, H, N, b, d))
  eta = jax.random.uniform(k[3], (B, H, N, b), minval=0.5, maxval=1.0) / b
  f = 4 * d if kind == "ttt_mlp" else d
  weights = [0.02 * jax.random.normal(k[4], (H, d, f)), jnp.zeros((H, 1, f))]
  if kind == "ttt_mlp":
    weights += [0.02 * jax.random.normal(k[5], (H, f, d)), jnp.zeros((H, 1, d))]
  args = (xq, xk, xv, eta, jnp.ones((H, d)), jnp.zeros((H, d)), *weights)
  return tuple(a.astype(dtype) for a in args)


def build(impl, kind, mode, checkpoint_group):
  fwd = (functools.partial(OPS[kind], checkpoint_group=checkpoint_group) if impl == "dual"
         else functools.partial(per_token_ttt, kind))
  if mode == "fwd":
    return jax.jit(fwd)
  # Gradients with respect to every input, as training needs.
  loss = lambda *a: jnp.sum(fwd(*a).astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=tuple(range(10 if kind == "ttt_mlp" else 8))))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  csv = lambda t: lambda s: [t(v) for v in s.split(",")]
  p.add_argument("--kinds", type=csv(str), default=["ttt_mlp", "ttt_linear"])
  p.add_argument("--dtypes", type=csv(str), default=["float32", "bfloat16"])
  p.add_argument("--modes", type=csv(str), default=["fwd", "fwd_bwd"])
  p.add_argument("--num_mini_batches", type=csv(int), default=[4, 16, 64])
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=1)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--mini_batch", type=int, default=64)
  p.add_argument("--checkpoint_group", type=int, default=16)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--per_token", action=argparse.BooleanOptionalAction, default=True,
                 help="also time the per-token loop form (slow at large N)")
  p.add_argument("--matmul_size", type=int, default=None,
                 help="side of the reference matmul (default 1024 on CPU, 8192 otherwise)")
  p.add_argument("--out", default=None, help="also append the JSON lines to this file")
  args = p.parse_args(argv)

  base = dict(device_fields("ttt_op"), batch=args.batch, heads=args.heads, head_dim=args.head_dim,
              mini_batch=args.mini_batch, checkpoint_group=args.checkpoint_group)
  msize = args.matmul_size or default_matmul_size()
  peak = {dt: matmul_rate(jnp.dtype(dt), msize, args.repeats) for dt in args.dtypes}
  emit = Emitter(args.out, ("impl", "kind", "mode", "dtype", "tokens", "median_ms",
                            "gflops_per_s", "pct_of_matmul_rate", "speedup_vs_per_token"))
  for kind in args.kinds:
    for dtype in args.dtypes:
      for N in args.num_mini_batches:
        shape = (args.batch, args.heads, N, args.mini_batch, args.head_dim)
        inputs = make_inputs(kind, *shape, jnp.dtype(dtype))
        check = None
        if args.per_token:  # the two forms must agree before their times mean anything
          a = build("dual", kind, "fwd", args.checkpoint_group)(*inputs).astype(jnp.float32)
          b = build("per_token", kind, "fwd", 0)(*inputs).astype(jnp.float32)
          check = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        for mode in args.modes:
          flops = ops.ttt_flops(kind, args.batch, args.heads, N, args.mini_batch,
                                args.head_dim) * (3 if mode == "fwd_bwd" else 1)
          times = {impl: time_fn(build(impl, kind, mode, args.checkpoint_group), inputs,
                                 args.repeats)
                   for impl in (["dual", "per_token"] if args.per_token else ["dual"])}
          for impl, ms in times.items():
            gflops = flops / ms / 1e6
            row = dict(base, impl=impl, kind=kind, mode=mode, dtype=dtype, num_mini_batches=N,
                       tokens=N * args.mini_batch, median_ms=round(ms, 4), flops=flops,
                       gflops_per_s=round(gflops, 3), matmul_gflops_per_s=round(peak[dtype], 3),
                       pct_of_matmul_rate=round(100 * gflops / peak[dtype], 2),
                       rel_err_dual_vs_per_token=check)
            if impl == "dual" and "per_token" in times:
              row["speedup_vs_per_token"] = round(times["per_token"] / ms, 2)
            emit(row)
  emit.close()


if __name__ == "__main__":
  main()
