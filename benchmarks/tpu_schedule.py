"""What libtpu's scheduler makes of the Mosaic TPU TTT kernels: bundles of their mini-batch loops.

Each kernel (`tpu.forward`; `tpu.backward`, which recomputes a group then runs it in reverse) is
compiled in a child process for a compile-only TPU (libtpu's topology: `pip install -e .[tpu]`,
no TPU needed) with libtpu's LLO dumps on (LIBTPU_INIT_ARGS=--xla_jf_dump_to=DIR
--xla_jf_dump_llo_text=true), and its final VLIW bundles are read back. A TensorCore issues
one bundle a clock, in order, and the scheduler has already placed every fixed latency (MXU
result pops, EUP, XLU), so a loop body's bundle count is its clocks per iteration: a static
estimate that leaves out only what waits at run time (the DMA waits at grid-step edges, which
the pipeline's double buffering should hide, and stalls on memory conflicts).

One JSON line per kernel: the innermost loops' bundles a mini-batch of one head (forward
`step`, backward `recompute` and `reverse`; a forward loop that runs a step's heads together,
`BlockSizes.interleave_heads`, counts as 1 / heads_per_step of its bundles each), the grid
step's bundles outside them (`step_overhead_bundles`, shared by the k x heads_per_step
mini-batches of a forward step or the g x heads_per_step of a backward group),
`bundles_per_mini_batch` (per head, overhead shared out), and how busy each VLIW unit is in the
loops (`unit_ops_per_bundle`: MXU pushes and matmuls, VALU, XLU, result pops, EUP, vector
loads/stores and spills, from libtpu's per-bundle utilization dump). `pct_of_mxu_peak` is the
dual-form matmul FLOPs of a mini-batch (`ttt_jax.ops.ttt_flops`; the backward counts 2x the
forward's, as fwd+bwd = 3x fwd in ttt_kernels.py) over bundles x the TensorCore's MXU FLOPs a
clock (`CHIPS`, from published peaks: an assumption, not a reading). Inputs are bf16 (the
kernels' matmul operands then too) unless `--dtype=float32` (f32 operands at jax's default
precision: one bf16 pass on the MXU); `--precision=highest` traces under
`jax.default_matmul_precision("highest")`, which makes the f32 products six passes, as all of
them were before the kernels followed jax's default.

  python benchmarks/tpu_schedule.py                                   # v5p, v5e, v6e
  python benchmarks/tpu_schedule.py --topologies=v5p-2 --dtype=float32 --precision=highest
  python benchmarks/tpu_schedule.py --topologies=v5p-2 --mini_batch=16 --head_dim=128
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time

from bench_util import compile_in_child

KERNELS = ("forward", "backward")

# device_kind -> (bf16 TFLOP/s a chip, TensorCores a chip, MXU FLOPs a clock a TensorCore):
# published peaks and MXU shapes (v5p: 4 MXUs of 128x128, 2 cores; v5e: 4 of 128x128;
# v6e: 4 of 256x256); the clock is derived from them.
CHIPS = {"TPU v5": (459, 2, 4 * 128 * 128 * 2), "TPU v5 lite": (197, 1, 4 * 128 * 128 * 2),
         "TPU v6 lite": (918, 1, 4 * 256 * 256 * 2)}

_BUNDLE = re.compile(r"\s*(0x[0-9a-f]+|\d+)\s+(LB:|LH:|LE:|PB:|PF:|CT:|:)[\s>]*\{")


def parse_bundles(text: str) -> list[tuple[int, str | None, str | None]]:
  """(address, the region a loop body starting here opens, the region a branch here targets)
  of each bundle in libtpu's final-bundles text. A loop body's first bundle reads
  `0x22d LB: >> { ... } /* Start region 391 :: ... */` (its own region first) and the branch
  back to it `... sbr.rel (!%p1) target = $region391 ...`."""
  out = []
  for line in text.splitlines():
    if m := _BUNDLE.match(line):
      opens = re.search(r"Start region (\d+)", line) if m.group(2) == "LB:" else None
      target = re.search(r"sbr\.rel \([^)]*\) target = \$region(\d+)", line)
      out.append((int(m.group(1), 0), opens and opens.group(1), target and target.group(1)))
  return out


def loops(bundles) -> list[dict]:
  """Each loop body, from its first bundle to the branch back to it (every bundle between
  runs each iteration, but for forward branches inside), and whether it holds no other loop.
  In program order."""
  out = []
  for i, (start, region, _) in enumerate(bundles):
    if region is None:
      continue
    ends = [j for j in range(i, len(bundles)) if bundles[j][2] == region]
    if not ends:
      raise ValueError(f"no branch back to the loop body at {start:#x} (region {region})")
    j = ends[-1]
    out.append(dict(start=start, end=bundles[j][0], bundles=bundles[j][0] - start + 1,
                    innermost=not any(b[1] for b in bundles[i + 1:j + 1])))
  return out


def unit_use(text: str, spans) -> dict:
  """Ops a bundle of each VLIW unit over the bundles in `spans` ([(first, last)]), from the
  per-bundle utilization dump (a header naming the units, their capacities, then one row of
  counts per bundle in address order)."""
  lines = [l for l in text.splitlines() if l.strip()]
  head = next(i for i, l in enumerate(lines) if "MXU" in l)
  names = lines[head].replace(",", " ").split()
  rows = [list(map(int, l.split())) for l in lines[head + 2:] if l.split()[0].isdigit()]
  picked = [r for lo, hi in spans for r in rows[lo:hi + 1]]
  return {n.lower().replace(":", "_"): round(sum(r[k] for r in picked) / max(len(picked), 1), 3)
          for k, n in enumerate(names)}


def summarize(kernel: str, bundles_text: str, util_text: str, row: dict) -> dict:
  """The fields of a kernel's row from its dumps and the child's `row` (shapes, block sizes)."""
  bundles = parse_bundles(bundles_text)
  found = loops(bundles)
  inner = [l for l in found if l["innermost"]]
  grid = [l for l in found if not l["innermost"]]  # the grid loop, the first
  hb = row["heads_per_step"]
  # A loop per head, or with interleave_heads one forward loop running the hb heads together
  loop_heads = hb if kernel == "forward" and row.get("interleave_heads") else 1
  if kernel == "forward":
    names, per_step = ["step"] * (hb // loop_heads), row["mini_batches_per_step"] * hb
  else:  # per head: recompute the group, then run it in reverse
    names, per_step = ["recompute", "reverse"] * hb, row["checkpoint_group"] * hb
  if len(inner) != len(names) or not grid:
    raise SystemExit(f"{kernel}: expected {len(names)} mini-batch loop(s) in one grid loop "
                     f"({hb} head(s) a step), found loops {found}")
  fields = {}
  for name in dict.fromkeys(names):  # bundles a mini-batch of one head
    counts = [l["bundles"] / loop_heads for l, n in zip(inner, names) if n == name]
    fields[f"{name}_bundles"] = round(sum(counts) / len(counts), 1)
  overhead = grid[0]["bundles"] - sum(l["bundles"] for l in inner)
  per_mini_batch = sum(fields.values()) + overhead / per_step
  flops = row["flops_per_mini_batch"]
  chip = CHIPS.get(row["device_kind"])
  fields.update(step_overhead_bundles=overhead, bundles_per_mini_batch=round(per_mini_batch, 1),
                kernel_bundles=bundles[-1][0] + 1,
                unit_ops_per_bundle=unit_use(util_text, [(l["start"], l["end"]) for l in inner]))
  if chip:
    tflops, cores, per_clock = chip
    clock_ghz = tflops * 1e12 / cores / per_clock / 1e9
    fields.update(clock_ghz=round(clock_ghz, 3), mxu_flops_per_clock=per_clock,
                  us_per_mini_batch=round(per_mini_batch / clock_ghz / 1e3, 3),
                  pct_of_mxu_peak=round(100 * flops / (per_mini_batch * per_clock), 2))
  return fields


def _compile(kernel: str, args) -> dict:
  """In the child: compile one kernel (by default at the 5B layer's per-device shapes; the
  flags give others); its row's fields."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec, use_abstract_mesh

  from pallas_kernels.ttt import get_block_sizes, tpu, tpu_layout
  from pallas_kernels.ttt.tile import num_groups, state_shapes
  from ttt_jax import aot
  from ttt_jax.ops import ttt_flops

  devices = aot.get_topology(args.topology).devices
  mesh = Mesh(np.array(devices[:1]), ("x",))
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(
      shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))
  B, H, N, g = 1, args.heads, args.num_mini_batches, args.checkpoint_group
  b, d = args.mini_batch, args.head_dim
  x_dtype, f32 = jnp.dtype(args.dtype), jnp.float32
  sizes = get_block_sizes(devices[0].device_kind, x_dtype, d)
  for field in ("heads_per_step", "mini_batches_per_step", "tpu_layout"):  # other entries
    if getattr(args, field):
      sizes = dataclasses.replace(sizes, **{field: getattr(args, field)})
  if args.interleave_heads:
    sizes = dataclasses.replace(sizes, interleave_heads=args.interleave_heads == "1")
  hb = tpu.heads_per_step(sizes.heads_per_step, H)
  sizes = tpu_layout.fit_vmem(sizes, devices[0].device_kind, kind="ttt_mlp",  # as ttt_jax.ops
                              heads_per_step=hb, g=min(g, N), b=b, d=d,
                              in_bytes=x_dtype.itemsize)
  kw = dict(kind="ttt_mlp", eps=1e-6, checkpoint_group=g, heads_per_step=hb, block_sizes=sizes)
  xs = [spec((B, H, N, b, d), x_dtype)] * 3 + [spec((B, H, N, b), f32), spec((H, d), f32),
                                               spec((H, d), f32)]
  if kernel == "forward":
    fn = lambda *a: tpu.forward(*a[:6], a[6:], **kw)
    shapes = (*xs, *[spec((H, *s), f32) for s in state_shapes("ttt_mlp", d)])
  else:
    G = num_groups(N, g)
    fn = lambda *a: tpu.backward(*a[:6], a[6:-1], a[-1], **kw)
    shapes = (*xs, *[spec((B, H, G, *s), f32)
                     for s in tpu_layout.state_shapes("ttt_mlp", d, b, sizes.tpu_layout)],
              spec((B, H, N, b, d), x_dtype))
  precision = None if args.precision == "default" else args.precision  # None: jax's default
  t0 = time.perf_counter()
  with use_abstract_mesh(mesh.abstract_mesh), jax.default_matmul_precision(precision):
    jax.jit(fn).trace(*shapes).lower().compile()
  flops = ttt_flops("ttt_mlp", 1, 1, 1, b, d) * (1 if kernel == "forward" else 2)
  return dict(device_kind=devices[0].device_kind, jax=jax.__version__, batch=B, heads=H,
              mini_batches=N, mini_batch=b, head_dim=d, checkpoint_group=g, heads_per_step=hb,
              mini_batches_per_step=tpu.mini_batches_per_step(sizes.mini_batches_per_step, g),
              tpu_layout=sizes.tpu_layout, interleave_heads=sizes.interleave_heads,
              dtype=args.dtype, precision=args.precision, flops_per_mini_batch=flops,
              compile_s=round(time.perf_counter() - t0, 1))


def measure(kernel: str, topology: str, args) -> dict:
  """Runs the child for `kernel` with libtpu's dumps on; its row."""
  dump_env = lambda dump_dir: dict(
      ALLOW_MULTIPLE_LIBTPU_LOAD="1", TF_CPP_MIN_LOG_LEVEL="2",
      LIBTPU_INIT_ARGS=" ".join(filter(None, [os.environ.get("LIBTPU_INIT_ARGS"),
                                              f"--xla_jf_dump_to={dump_dir}",
                                              "--xla_jf_dump_llo_text=true"])))
  argv = [f"--child={kernel}", f"--topologies={topology}", f"--heads={args.heads}",
          f"--dtype={args.dtype}", f"--precision={args.precision}",
          f"--num_mini_batches={args.num_mini_batches}",
          f"--checkpoint_group={args.checkpoint_group}", f"--mini_batch={args.mini_batch}",
          f"--head_dim={args.head_dim}", f"--heads_per_step={args.heads_per_step}",
          f"--mini_batches_per_step={args.mini_batches_per_step}",
          f"--tpu_layout={args.tpu_layout}", f"--interleave_heads={args.interleave_heads}"]
  name = f"ttt_mlp_{kernel}_tpu"
  # The two dumps read: the final bundles and the per-bundle unit use of the final schedule.
  suffixes = ("-final_bundles.txt", "final_hlo-static-per-bundle-utilization.txt")
  row, _, dumps = compile_in_child(__file__, argv, dump_env,
                                   f"compiling the {kernel} for {topology}",
                                   lambda f: name in f and f.endswith(suffixes))
  found = {s: [t for f, t in dumps.items() if f.endswith(s)] for s in suffixes}
  if any(len(t) != 1 for t in found.values()):
    raise SystemExit(f"expected one of each of {suffixes} for {name} from libtpu, found "
                     f"{sorted(dumps)}: this libtpu may name its LLO dumps differently.")
  fields = summarize(kernel, found[suffixes[0]][0], found[suffixes[1]][0], row)
  return dict(bench="tpu_schedule", kernel=kernel, topology=topology, **row, **fields)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated of {KERNELS}")
  p.add_argument("--topologies", default="v5p-2,v5e-1,v6e-1",
                 help="comma-separated one-chip TPU topologies (ttt_jax.aot names)")
  p.add_argument("--heads", type=int, default=12, help="heads a device (5B: 48 / tensor 4)")
  p.add_argument("--num_mini_batches", type=int, default=64)
  p.add_argument("--checkpoint_group", type=int, default=16)
  p.add_argument("--mini_batch", type=int, default=64, help="tokens a mini-batch (b)")
  p.add_argument("--head_dim", type=int, default=64, help="d")
  p.add_argument("--heads_per_step", type=int, default=0,
                 help="BlockSizes.heads_per_step instead of the tuning table's (0: the table's)")
  p.add_argument("--mini_batches_per_step", type=int, default=0,
                 help="BlockSizes.mini_batches_per_step instead of the table's (0: the table's)")
  p.add_argument("--tpu_layout", default="", choices=("", "db", "bd"),
                 help="BlockSizes.tpu_layout instead of the table's ('': the table's)")
  p.add_argument("--interleave_heads", default="", choices=("", "0", "1"),
                 help="BlockSizes.interleave_heads instead of the table's ('': the table's)")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                 help="the inputs' dtype (the state is float32 either way)")
  p.add_argument("--precision", default="default", choices=("default", "high", "highest"),
                 help="jax.default_matmul_precision while the kernels are traced")
  p.add_argument("--out", default=None, help="append the JSON lines to this file too")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    args.topology = args.topologies
    print(json.dumps(_compile(args.child, args)))
    return 0
  for topology in args.topologies.split(","):
    for kernel in args.kernels.split(","):
      if kernel not in KERNELS:
        raise SystemExit(f"--kernels: {kernel!r} is not one of {KERNELS}")
      line = json.dumps(measure(kernel, topology, args))
      print(line, flush=True)
      if args.out:
        with open(args.out, "a") as f:
          f.write(line + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
