"""What the Mosaic GPU TTT kernels ask of a Hopper SM when compiled: shared memory, registers,
spills, and the instruction mix of the mini-batch loop.

Each kernel is compiled in a child process with Mosaic GPU's dumps on (MOSAIC_GPU_DUMP_PTXAS,
MOSAIC_GPU_DUMP_RESOURCES, MOSAIC_GPU_DUMP_SASS into a temporary MOSAIC_GPU_DUMP_TO), for a
compile-only H100 from jax's CUDA plugin (no GPU needed) or for this machine's GPU
(--topology=local). One JSON line per kernel: shapes, the shared memory Mosaic GPU allocates
and the kernel's own estimate (`smem_bytes`), registers per thread, the stack frame and the
spill stores / loads ptxas reports (bytes of spill instructions in the code, not traffic), and
compile seconds. A static profile, not a timing: it tells whether a change keeps a kernel
within one SM's registers and shared memory before a GPU is at hand, and it is what to compare
against when tuning on one.

With nvdisasm (on PATH, or `pip install nvidia-cuda-nvdisasm`) the row adds the SASS of the
mini-batch loop (`loop_profile`): its instructions per thread, its HGMMA (wgmma) instructions,
the tensor-core clocks those take on one SM (a dense bf16 HGMMA.64xNx16 is N / 2 clocks at an
H100 SM's 2048 FMA per clock), and `tensor_bound_pct`, 100 x tensor clocks / max(tensor clocks,
instructions). The kernels run one warpgroup per SM: one warp per scheduler, which issues at
most one instruction per clock, so a mini-batch takes at least `loop_instructions` clocks and
the tensor cores can be busy for at most `tensor_bound_pct` % of them (before stalls, waits on
each wgmma and wave quantisation). It is a ceiling on the kernel's % of the matmul peak.
`serial_bound_pct` adds the clocks the loop stalls waiting on its matmuls
(`loop_exposed_tensor_clocks`, from a timeline of the loop: an instruction a clock, the HGMMAs
in order on the tensor cores, each wait on the wgmma groups stalling until they are done):
100 x tensor clocks / `loop_clocks` (instructions + stalled clocks, the timeline's estimate of
a mini-batch). Most matmuls are waited on right after they are issued, so this tighter bound is
the better estimate; work placed between a matmul's issue and its wait
(`gpu_cluster_lib.matmul_during`) hides it.

An instruction a clock is optimistic: with one warp a scheduler nothing fills the clocks that
warp waits. The `.sass_ctrl` dump's control codes say how long: `loop_issue_clocks` issues
each instruction after the stall clocks ptxas put in the previous one's code (its dependent
fixed-latency chains, the MUFU pipe), and `loop_latency_clocks` also waits, on the
scoreboards those codes name, for variable-latency results (loads from a peer's shared memory,
shared memory, shuffles, MUFU) and for cluster barriers, at the latencies `LATENCY` and
`CLUSTER_BARRIER_CLOCKS` assume (published microbenchmark figures, not measured here);
`latency_bound_pct` is 100 x tensor clocks / `loop_latency_clocks`, and `loop_waits` the clocks
waited, by what (`stall counts`, `HGMMA`, `cluster barrier`, an opcode: its result, or with
`(operands)` its source registers being free); `prologue_latency_clocks` times what comes
before the loop the same way (in the backward, a group's prologue and first step). It is the
estimate to compare with a GPU run (`summarize.py --model`), which calibrates the assumed
latencies; spills' memory traffic is still unmodelled. `--warpgroups=2` adds a row of the forward
on two warpgroups a CTA (`gpu_cluster.forward`'s warpgroups): its timelines run the loop body
for two warps on one scheduler (`_timeline`'s warps: one issue a clock between them, the
tensor cores shared, each cluster barrier waiting for both), and its tensor clocks are the
CTA's.

  python benchmarks/kernel_resources.py                      # the cluster kernels on 4 and 8
  python benchmarks/kernel_resources.py --out=benchmarks/results/h100-resources.jsonl
  python benchmarks/kernel_resources.py --kernels=cluster_forward --cluster=4 --warpgroups=2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time

from bench_util import compile_in_child

# The forward (checkpoints every g mini-batches), the backward's recompute of one group (the
# forward kernel saving every state, W1 and W2 in bf16, without the output), the backward of
# one group, and the forward at checkpoint_group 1, which saves every state as the recompute
# does so that the backward recomputes nothing (`gpu.stores_states`); each on every --cluster.
KERNELS = ("cluster_forward", "cluster_recompute", "cluster_backward", "cluster_forward_g1")


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


# What the latency timeline (`_timeline(..., latency=True)`) assumes, in clocks: when a
# variable-latency instruction's result (its write scoreboard) is ready, by opcode; when its
# source registers are free again (its read scoreboard); and a cluster barrier's round trip
# (arrive, release fence, wait). Assumptions, not measurements: a load from a peer's shared
# memory (LD through a generic address) is an SM-to-SM round trip, about 200 clocks on an H100
# in published microbenchmarks; shared memory, shuffles and the special-function unit take
# tens. Only a GPU run calibrates them (`gpu_session.sh`).
LATENCY = dict(LD=200, LDL=30, LDS=30, LDSM=30, SHFL=25, MUFU=20, S2R=20)
OTHER_LATENCY, READ_LATENCY, CLUSTER_BARRIER_CLOCKS = 20, 10, 300


def _control(line: str) -> tuple[set[str], str | None, str | None, int]:
  """A `.sass_ctrl` line's control code, `wait:read:write:yield:stall` before the address
  (waits: one scoreboard, `a&b`, or a hex mask): (scoreboards waited on, read scoreboard, write
  scoreboard, stall clocks before the warp's next issue); a line without one: nothing, 1."""
  m = re.match(r"\s*([0-9a-fx&-]+):([0-9-]+):([0-9-]+):[Y-]:(\d+)\s+/\*", line)
  if not m:
    return set(), None, None, 1
  wait, read, write, stall = m.groups()
  if wait.startswith("0x"):
    waits = {str(k) for k in range(6) if int(wait, 16) >> k & 1}
  else:
    waits = set(wait.split("&")) - {"-"}
  return waits, None if read == "-" else read, None if write == "-" else write, int(stall)


def _timeline(body, issue: bool = False, latency: bool = False,
              warps: int = 1) -> tuple[int, dict]:
  """Clocks a loop body, (opcode, line) pairs, takes on a timeline of one warp scheduler, and
  the clocks its first warp waits, by what it waits on. The kernels run one warpgroup a CTA,
  one warp a scheduler, so nothing else issues in its gaps; `warps` > 1 runs that many copies
  of the body (a CTA's warpgroups, which run the same code on their own slices) on the one
  scheduler, each issuing when it may, at most one instruction a clock between them, and the
  clocks are when the last finishes. The tensor cores run the HGMMAs in order, each from when
  both it is issued and the previous one (any warp's) is done, for N / 2 clocks
  (HGMMA.64xNx16); an HGMMA marked gsb0 closes a group, and `WARPGROUP.DEPBAR.LE gsb0, k`
  stalls its warp until all but its last k groups are done. Issue: one instruction a clock, or
  with `issue` the stall clocks ptxas put in each control code (the dependent fixed-latency
  chains). With `latency` also the waits on variable-latency results (scoreboards, `LATENCY`)
  and cluster barriers: a warp arrives at its `UCGABAR_ARV` (or, with none before it, at its
  `UCGABAR_WAIT`) and its `UCGABAR_WAIT` waits until `CLUSTER_BARRIER_CLOCKS` after the last
  warp's arrival (the barrier counts every thread of the cluster; the peer CTAs are taken to
  arrive with this one), so work between the two overlaps the round trip."""
  busy_until, free = 0, 0  # the tensor cores' queue; the scheduler's next free issue slot
  w = [dict(pc=0, clock=0, open_end=None, done_at=[], ready={}, producer={}, waited={},
            arrived=0, barriers=0, barrier=None, step=1) for _ in range(warps)]
  arrivals, release = {}, {}  # cluster barrier k -> the warps' arrival clocks, its release

  def arrive(v, at):  # warp v arrives at its next cluster barrier; the last releases it
    v["arrived"] += 1
    k = v["arrived"]
    arrivals.setdefault(k, []).append(at)
    if len(arrivals[k]) == warps:
      release[k] = max(arrivals[k]) + CLUSTER_BARRIER_CLOCKS
      for u in w:
        if u["barrier"] == k:
          u["clock"] = wait(u, u["clock"], "cluster barrier", release[k]) + u["step"]
          u["barrier"] = None

  def candidate(v):  # the clock warp v may issue its next instruction, and what it waits on
    t, what = max(v["clock"], free), None
    waits = _control(body[v["pc"]][1])[0]
    if latency and waits:
      last = max(waits, key=lambda k: v["ready"].get(k, 0))
      if v["ready"].get(last, 0) > t:
        t, what = v["ready"][last], v["producer"].get(last, "?")
    return t, what

  def wait(v, t, what, until):
    if until > t:
      v["waited"][what] = v["waited"].get(what, 0) + until - t
    return max(t, until)

  while True:
    live = [(candidate(v), v) for v in w if v["pc"] < len(body) and v["barrier"] is None]
    if not live:
      break
    (t, what), v = min(live, key=lambda c: c[0][0])
    op, line = body[v["pc"]]
    _, read, write, stall = _control(line)
    v["pc"] += 1
    free = t + 1
    at = wait(v, v["clock"], what, t) if what else t  # (the slot, not a wait, when what is None)
    if m := re.match(r"HGMMA\.64x(\d+)x16", op):
      busy_until = max(at, busy_until) + int(m.group(1)) // 2
      v["open_end"] = busy_until
      if "gsb0" in line.split(op, 1)[1]:
        v["done_at"].append(v["open_end"])
        v["open_end"] = None
    elif op.startswith("WARPGROUP.DEPBAR") and (m := re.search(r"gsb0,\s*0x([0-9a-f]+)", line)):
      keep, done_at = int(m.group(1), 16), v["done_at"]
      done, v["done_at"] = done_at[:max(0, len(done_at) - keep)], done_at[len(done_at) - keep:]
      if done:
        at = wait(v, at, "HGMMA", done[-1])
    step = max(1, stall) if issue else 1
    if step > 1:
      v["waited"]["stall counts"] = v["waited"].get("stall counts", 0) + step - 1
    if latency and op.startswith("UCGABAR_ARV"):
      arrive(v, at)
    if latency and op.startswith("UCGABAR_WAIT"):  # until the barrier's release
      v["barriers"] += 1  # its k-th: the others' k-th is the same barrier
      k = v["barriers"]
      v["barrier"], v["clock"], v["step"] = k, at, step
      if v["arrived"] < k:  # no arrival of its own before: it arrives here
        arrive(v, at)
      elif k in release:
        v["clock"] = wait(v, at, "cluster barrier", release[k]) + step
        v["barrier"] = None
      continue
    if latency:
      name = op.split(".")[0]
      if write:
        v["ready"][write], v["producer"][write] = at + LATENCY.get(name, OTHER_LATENCY), name
      if read:
        v["ready"][read], v["producer"][read] = at + READ_LATENCY, name + " (operands)"
    v["clock"] = at + step
  return max(v["clock"] for v in w), w[0]["waited"]



def loop_profile(sass: str, warps: int = 1) -> dict:
  """The SASS loop whose body holds the most HGMMA instructions (a backward branch to an
  earlier label: the kernel's mini-batch loop; not the branches back from the out-of-line
  barrier-wait retries that ptxas puts after EXIT): instruction and HGMMA counts (a warp's),
  tensor clocks (the CTA's: `warps` warpgroups run the loop), the clocks it stalls on them and
  the bounds they imply, and the two fuller timelines with what the first warp waits on (see
  the module docstring); {} if there is no such loop."""
  labels, ops, targets = {}, [], []
  for line in sass.splitlines():
    if m := re.match(r"\s*(\.L_x_\d+):", line):
      labels[m.group(1)] = len(ops)
    elif m := re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)", line):
      ops.append((m.group(1), line))
      t = re.search(r"BRA\s.*?`\((\.L_x_\d+)\)", line)
      targets.append(t.group(1) if t else None)
  best = None
  for end, target in enumerate(targets):
    if target is not None and labels.get(target, end + 1) <= end:
      body = ops[labels[target]:end + 1]
      if any(o == "EXIT" for o, _ in body):
        continue
      hgmma = [o for o, _ in body if o.startswith("HGMMA")]
      if best is None or len(hgmma) > len(best[1]):
        best = (body, hgmma, labels[target])
  if not best or not best[1]:
    return {}
  body, hgmma, start = best
  tensor = warps * sum(int(m.group(1)) // 2 for o in hgmma
                       if (m := re.match(r"HGMMA\.64x(\d+)x16", o)))
  clocks, on_hgmma = _timeline(body, warps=warps)  # an instruction a clock, HGMMA waits
  issue_clocks, _ = _timeline(body, issue=True, warps=warps)
  latency_clocks, waited = _timeline(body, issue=True, latency=True, warps=warps)
  return dict(loop_instructions=len(body), loop_hgmma=len(hgmma), loop_tensor_clocks=tensor,
              tensor_bound_pct=round(100 * tensor / max(tensor, warps * len(body)), 1),
              loop_exposed_tensor_clocks=on_hgmma.get("HGMMA", 0), loop_clocks=clocks,
              serial_bound_pct=round(100 * tensor / clocks, 1),
              loop_issue_clocks=issue_clocks, loop_latency_clocks=latency_clocks,
              latency_bound_pct=round(100 * tensor / latency_clocks, 1),
              loop_waits=dict(sorted(waited.items(), key=lambda kv: -kv[1])),
              # Everything before the loop on timeline (c): the backward's group prologue
              # and first step (the forward's has the initial loads, whose latency the
              # timeline does not know).
              prologue_latency_clocks=_timeline(ops[:start], issue=True, latency=True)[0])


def find_nvdisasm() -> str | None:
  """nvdisasm on PATH or from the nvidia-cuda-nvdisasm wheel; None if neither is installed."""
  if found := shutil.which("nvdisasm"):
    return found
  for root in sys.path:
    for sub in ("nvidia/cu13/bin", "nvidia/cuda_nvdisasm/bin"):
      if os.path.isfile(candidate := os.path.join(root, sub, "nvdisasm")):
        return candidate
  return None


def _compile(kernel: str, args) -> dict:
  """In the child: compile one kernel at the 5B layer's per-device shapes; its row's fields."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec, use_abstract_mesh

  from pallas_kernels.ttt import gpu_cluster, gpu_cluster_backward
  from ttt_jax import aot

  if root := os.environ.get("TTT_NVDISASM_ROOT"):  # where Mosaic GPU looks for bin/nvdisasm
    os.environ["MOSAIC_GPU_CUDA_ROOT"] = root  # (set from jax's CUDA path at its import)

  devices = jax.devices() if args.topology == "local" else aot.get_topology(args.topology).devices
  mesh = Mesh(np.array(devices[:1]), ("x",))
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(
      shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))
  B, H, b, d, P, W = 1, args.heads, 64, 64, args.cluster, args.warpgroups
  f, bf16, f32 = 4 * d, jnp.bfloat16, jnp.float32
  state = lambda lead, w_dtype, w2=(f, d): (spec((*lead, d, f), w_dtype), spec((*lead, 1, f), f32),
                                            spec((*lead, *w2), w_dtype), spec((*lead, 1, d), f32))
  ln = spec((H, d), f32)
  if kernel == "cluster_forward":
    N, smem = args.num_mini_batches, gpu_cluster.smem_bytes(b, d, P, warpgroups=W)
    fn = lambda *a: gpu_cluster.forward(*a, eps=1e-6, checkpoint_group=args.checkpoint_group,
                                        cluster=P, warpgroups=W)
    shapes = (*[spec((B, H, N, b, d), bf16)] * 3, spec((B, H, N, b), f32), ln, ln,
              state((H,), f32))
  elif kernel in ("cluster_recompute", "cluster_forward_g1"):  # every state saved
    recompute = kernel == "cluster_recompute"  # `gpu.backward`'s first half for one group
    N = args.checkpoint_group if recompute else args.num_mini_batches
    smem = gpu_cluster.smem_bytes(b, d, P)
    fn = lambda *a: gpu_cluster.forward(*a, eps=1e-6, checkpoint_group=1, cluster=P,
                                        per_example_init=recompute, weights_dtype=bf16,
                                        output=not recompute)
    shapes = (*[spec((B, H, N, b, d), bf16)] * 3, spec((B, H, N, b), f32), ln, ln,
              state((B, H) if recompute else (H,), f32))
  else:  # one group of the reverse sweep
    N, smem = args.checkpoint_group, gpu_cluster_backward.smem_bytes(b, d, P)
    fn = lambda *a: gpu_cluster_backward.backward_group(*a, eps=1e-6, cluster=P)
    xs = (*[spec((B, H, N, b, d), bf16)] * 3, spec((B, H, N, b), f32))
    stack_w2 = gpu_cluster.w2_shape(d, P, f)  # as the recompute saves them
    shapes = (xs, ln, ln, state((B, H, N + 1), bf16, stack_w2), spec((B, H, N, b, d), bf16),
              state((B, H), f32))
  t0 = time.perf_counter()
  with use_abstract_mesh(mesh.abstract_mesh):
    jax.jit(fn).trace(*shapes).lower().compile()
  return dict(device_kind=devices[0].device_kind, jax=jax.__version__, batch=B, heads=H,
              mini_batches=N, mini_batch=b, head_dim=d, cluster=P, warpgroups=W,
              smem_estimate_bytes=smem,
              compile_s=round(time.perf_counter() - t0, 1))


def measure(kernel: str, cluster: int, args, warpgroups: int = 1) -> dict:
  """Runs the child for `kernel` on `cluster` CTAs a head with the dumps on; its row."""
  def dump_env(dump_dir):
    env = dict(MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_RESOURCES="1",
               MOSAIC_GPU_DUMP_TO=dump_dir,  # compile-only: no CUDA runtime needed
               JAX_SKIP_CUDA_CONSTRAINTS_CHECK=os.environ.get("JAX_SKIP_CUDA_CONSTRAINTS_CHECK",
                                                              "1"))
    if nvdisasm := find_nvdisasm():  # for Mosaic GPU's SASS dump: $MOSAIC_GPU_CUDA_ROOT/bin
      env.update(MOSAIC_GPU_DUMP_SASS="1", PATH=os.pathsep.join(
          [os.path.dirname(nvdisasm), os.environ.get("PATH", "")]),
                 TTT_NVDISASM_ROOT=os.path.dirname(os.path.dirname(nvdisasm)))
    return env

  argv = [f"--child={kernel}", f"--topology={args.topology}", f"--heads={args.heads}",
          f"--cluster={cluster}", f"--num_mini_batches={args.num_mini_batches}",
          f"--checkpoint_group={args.checkpoint_group}", f"--warpgroups={warpgroups}"]
  row, log, dumps = compile_in_child(
      __file__, argv, dump_env, f"compiling {kernel}",
      lambda name: name.endswith((".ptxas", ".resources.txt", ".sass", ".sass_ctrl")))
  sass = "".join(t for n, t in dumps.items() if n.endswith((".sass", ".sass_ctrl")))
  return dict(bench="kernel_resources", kernel=kernel, topology=args.topology, **row,
              **parse_dump(log + "".join(dumps.values())), **loop_profile(sass, warpgroups))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated of {KERNELS}")
  p.add_argument("--topology", default="h100-1",
                 help="h100-1 / h200-1 (compile-only, jax's CUDA plugin) or local (this GPU)")
  p.add_argument("--heads", type=int, default=12, help="heads per device (5B: 48 / tensor)")
  p.add_argument("--cluster", default="4,8", help="CTAs per head, comma-separated: a row each")
  p.add_argument("--num_mini_batches", type=int, default=32)
  p.add_argument("--checkpoint_group", type=int, default=16)
  p.add_argument("--warpgroups", type=int, default=1,
                 help="2: also the forward with two warpgroups a CTA (cluster 4 only; a row)")
  p.add_argument("--out", default=None, help="append the JSON lines to this file too")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    args.cluster = int(args.cluster)
    print(json.dumps(_compile(args.child, args)))
    return
  kernels = args.kernels.split(",")
  if unknown := [k for k in kernels if k not in KERNELS]:
    raise SystemExit(f"--kernels: {unknown} not in {KERNELS}")
  out = open(args.out, "a") if args.out else None
  rows = [(kernel, cluster, 1) for cluster in (int(c) for c in args.cluster.split(","))
          for kernel in kernels]
  if args.warpgroups > 1 and "cluster_forward" in kernels:
    rows.append(("cluster_forward", 4, args.warpgroups))
  for kernel, cluster, warpgroups in rows:
    line = json.dumps(measure(kernel, cluster, args, warpgroups))
    print(line, flush=True)
    if out:
      out.write(line + "\n")


if __name__ == "__main__":
  main()
