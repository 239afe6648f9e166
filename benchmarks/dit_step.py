"""Times one denoising step of the DiT (forward, and forward + backward) per preset, duration
and variant, side by side in one run.

One JSON line per (preset, seconds, variant, mode): device, jax version, tokens, median ms,
FLOPs as XLA counts them for the compiled step (`cost_analysis`), achieved GFLOP/s and % of the
matmul rate measured in the same run. The table on stderr adds the cost over
`local_attention` at the same length and the growth over the shortest duration, so TTT's
linear growth and full attention's quadratic growth are read off one run.

  python benchmarks/dit_step.py                                  # tiny, 3/9/18/30 s, 4 variants
  python benchmarks/dit_step.py --presets=debug --latent=16x24 --seconds=3,9 --modes=fwd
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench_util import Emitter, default_matmul_size, device_fields, matmul_rate, time_fn
from configs.default import get_config
from ttt_jax import config as config_lib
from ttt_jax.nn.dit import DiT


def make_step(mode):
  forward = lambda model, video, text, t: model(video, text, t)
  if mode == "fwd":
    return jax.jit(forward)
  loss = lambda model, video, text, t: jnp.mean(jnp.square(forward(model, video, text, t)))
  return jax.jit(nnx.grad(loss))


def build(preset, seconds, variant, args):
  config = get_config(f"preset={preset},seconds={seconds},variant={variant}")
  m = config.model
  if args.latent:
    m.latent_height, m.latent_width = map(int, args.latent.split("x"))
    config.sequence.text_length = config_lib.text_length_for(
        config.sequence.num_chunks,
        config.sequence.num_frames * (m.latent_height // m.patch_size) * (
            m.latent_width // m.patch_size), m.ttt.mini_batch_size, min_length=8)
  m.dtype, m.remat_policy = args.dtype, args.remat_policy
  config_lib.validate(config)
  model = DiT.from_config(config, rngs=nnx.Rngs(0))
  s = config.sequence
  rng = np.random.default_rng(0)
  video = jnp.asarray(rng.normal(size=(args.batch, s.num_frames, m.in_channels,
                                       m.latent_height, m.latent_width)), jnp.float32)
  text = jnp.asarray(rng.normal(size=(args.batch, s.num_chunks, s.text_length, m.text_dim)),
                     jnp.float32)
  t = jnp.full((args.batch,), 500.0)
  return config, (model, video, text, t)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  csv = lambda t: lambda s: [t(v) for v in s.split(",")]
  p.add_argument("--presets", type=csv(str), default=["tiny"])
  p.add_argument("--seconds", type=csv(int), default=[3, 9, 18, 30])
  p.add_argument("--variants", type=csv(str), default=list(config_lib.VARIANTS))
  p.add_argument("--modes", type=csv(str), default=["fwd", "fwd_bwd"])
  p.add_argument("--latent", default=None, help="HxW latent size override, e.g. 16x24")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--remat_policy", default="none")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--matmul_size", type=int, default=None)
  p.add_argument("--out", default=None, help="also append the JSON lines to this file")
  args = p.parse_args(argv)

  peak = matmul_rate(jnp.dtype(args.dtype), args.matmul_size or default_matmul_size(),
                     args.repeats)
  emit = Emitter(args.out, ("preset", "seconds", "variant", "mode", "tokens", "median_ms",
                            "gflops_per_s", "pct_of_matmul_rate", "x_local_attention",
                            "x_shortest"))
  times = {}
  for preset in args.presets:
    for seconds in args.seconds:
      # local_attention first: the others are reported relative to it.
      for variant in sorted(args.variants, key=lambda v: v != "local_attention"):
        config, inputs = build(preset, seconds, variant, args)
        layout = config_lib.sequence_layout(config)
        for mode in args.modes:
          step = make_step(mode)
          cost = step.lower(*inputs).compile().cost_analysis()
          cost = cost[0] if isinstance(cost, list) else cost
          flops = float(cost.get("flops", 0.0))
          ms = time_fn(step, inputs, args.repeats)
          times[preset, seconds, variant, mode] = ms
          row = dict(device_fields("dit_step"), preset=preset, seconds=seconds, variant=variant,
                     mode=mode, dtype=args.dtype, batch=args.batch, tokens=layout.total_tokens,
                     layers=config.model.num_layers, model_dim=config.model.model_dim,
                     median_ms=round(ms, 3), flops=flops,
                     gflops_per_s=round(flops / ms / 1e6, 3),
                     matmul_gflops_per_s=round(peak, 3),
                     pct_of_matmul_rate=round(100 * flops / ms / 1e6 / peak, 2))
          local = times.get((preset, seconds, "local_attention", mode))
          if local:
            row["x_local_attention"] = round(ms / local, 2)
          shortest = times.get((preset, args.seconds[0], variant, mode))
          if shortest:
            row["x_shortest"] = round(ms / shortest, 2)
          emit(row)
  emit.close()


if __name__ == "__main__":
  main()
