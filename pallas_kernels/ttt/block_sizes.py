"""Tuning table for the TTT-MLP kernels, keyed by (device kind prefix, dtype, head_dim).

GPU: `cluster` > 0 runs TTT-MLP's forward and backward as the Mosaic GPU kernels of
`gpu_cluster.py` and `gpu_cluster_backward.py`, the state split over `cluster` CTAs per head
(where their `supports` take the shape: bf16, b = d = 64, cluster = 4 or 8), and
`wave_cluster` the split instead where its grid then fits one wave of the chip's SMs
(`gpu.cluster_size`: 8 when B x H <= 16 on an H100, whose 132 SMs take 48 CTAs at 4 and 128
at 8: a mini-batch costs about two thirds of the time at 8 with half the state a CTA, so one
wave at 8 beats one at 4, while two at 4 about tie with three at 8); otherwise the Triton
kernels of `gpu.py`, one program per (batch, head), whose tunables are Triton's `num_warps`
and `num_stages`. TPU (Mosaic, `tpu.py`):
`heads_per_step` heads and, in the forward, `mini_batches_per_step` consecutive mini-batches
share a grid step (amortising the ~0.35 us per-step overhead over more matmuls: one mini-batch
of one head is tens of nanoseconds of MXU work at d = 64; and giving the pipeline larger DMAs;
the backward's step is already a whole checkpoint group), and `vmem_limit_bytes` raises Mosaic's
scoped VMEM limit for the backward's per-group state stack (`tpu_layout.fit_vmem` raises it
further where a shape needs more, up to the chip's VMEM: `VMEM_CAPACITY`, and names the fix
where even that is too little), `tpu_layout` picks the kernels' tiles: [d, b] ("db") or
[b, d] ("bd"), and `interleave_heads` runs a forward step's heads in one mini-batch loop
instead of one each.

No entry has been measured yet (no accelerator was available when they were written): 8 warps
for d = 64 is a guess that gives the large loop-carried state (W1, W2: 2 x 64 KiB in f32) more
registers; one stage because the loop carries the state, leaving little to software-pipeline;
the backward's VMEM at d = 64 and g = 16 (about 12 MiB a step of two heads on bf16 inputs,
19 MiB on f32; 16 and 27 MiB at three, a v5p's; 21 and 35 MiB at four, a v5e's or v6e's;
tiles padded to (8, 128): `tpu_layout.vmem_estimate`) stays under the 48 MiB limit. The TPU
entries are picks from compile-only bundle counts (benchmarks/tpu_schedule.py), not timings;
the kernels compile with libtpu for v5p over the whole b x d grid (tests/test_pallas_ttt.py,
where libtpu is installed), and for v5e and v6e at the table's sizes (benchmarks/results).
Replace the entries with measured values and say so beside each entry.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Compiler parameters of the TTT-MLP kernels (GPU fields, then TPU fields)."""
  num_warps: int = 4
  num_stages: int = 1  # the mini-batch loop carries the state: nothing to software-pipeline
  cluster: int = 0  # GPU: CTAs per head for the Mosaic GPU TTT-MLP kernels (0: Triton)
  # GPU: CTAs per head instead, forward and backward, where B x H x wave_cluster CTAs fit one
  # wave of `sms` SMs (0: never; sms = 0: always)
  wave_cluster: int = 0
  sms: int = 0  # GPU: the device's SMs, for wave_cluster's count
  # GPU: warpgroups a CTA in the cluster forward (2: each CTA's hidden slice split between two,
  # `gpu_cluster.forward`; at cluster = 4 only, elsewhere 1; the backward keeps one)
  warpgroups: int = 1
  heads_per_step: int = 1  # TPU: heads per grid step (rounded down to a divisor of H)
  # TPU forward: mini-batches per grid step (`tpu.mini_batches_per_step` rounds it to fit g)
  mini_batches_per_step: int = 8
  # TPU: Mosaic's scoped VMEM limit, at least (None: its default); `tpu_layout.fit_vmem`
  # raises it where the backward needs more
  vmem_limit_bytes: int | None = None
  # TPU: the kernels' tiles (`tile.LAYOUTS`): "db" a feature a row, "bd" a token a row
  tpu_layout: str = "db"
  # TPU forward: one mini-batch loop runs the step's heads side by side (their independent
  # chains of matmuls and vector work for the scheduler to interleave) instead of a loop each
  interleave_heads: bool = False


DEFAULT = BlockSizes()


def _cluster(sms: int) -> BlockSizes:  # the cluster kernels' entry on an SXM-class Hopper
  return BlockSizes(num_warps=8, cluster=4, wave_cluster=8, sms=sms)


_TPU = BlockSizes(heads_per_step=2, mini_batches_per_step=16, vmem_limit_bytes=48 << 20,
                  interleave_heads=True)
_TPU_128 = dataclasses.replace(_TPU, tpu_layout="bd", interleave_heads=False)
_ONE_CORE, _ONE_CORE_128 = (dataclasses.replace(s, heads_per_step=4) for s in (_TPU, _TPU_128))
_V5P = dataclasses.replace(_TPU, heads_per_step=3)

# (device kind prefix, input dtype name or None for any, head_dim or None for any) -> sizes.
# The first matching entry wins; device kinds are matched case-insensitively by prefix.
TABLE: tuple[tuple[tuple[str, str | None, int | None], BlockSizes], ...] = (
    # 4 CTAs per head: 192 CTAs at the 5B shape (48 heads) over 132 SMs, 32 KiB of f32 state
    # each; one CTA per SM (shared memory), so two waves at B = 1 (`gpu_cluster` docstring).
    # 8 where B x H <= 16 (12 heads a device at tensor = 4): one wave either way, and a
    # mini-batch on the kernel_resources latency timeline takes 5,040 clocks instead of 6,355
    # in the forward, 13,708 instead of 18,790 in the backward. At 48 heads 4 wins there (two
    # waves of 6,355 against three of 5,040). One warpgroup a CTA: two (`warpgroups`) take
    # the forward's mini-batch from 6,208 to 5,724 clocks on the same timeline (two warps a
    # scheduler), but have never run on a GPU; `gpu_session.sh` times both.
    # num_warps is for the Triton kernels, should a shape fall back to them.
    (("NVIDIA H100 PCIe", "bfloat16", 64), _cluster(sms=114)),  # untuned
    (("NVIDIA H100", "bfloat16", 64), _cluster(sms=132)),  # untuned
    (("NVIDIA H200", "bfloat16", 64), _cluster(sms=132)),  # untuned
    (("NVIDIA H100", None, 64), BlockSizes(num_warps=8, num_stages=1)),  # untuned
    (("NVIDIA H200", None, 64), BlockSizes(num_warps=8, num_stages=1)),  # untuned
    # 16 mini-batches a forward grid step (g = 16 allows it) share the step's bundles outside
    # the loop among twice as many: 652 -> 635 bundles a mini-batch on a v5p, 653 -> 637 on a
    # v5e, 609 -> 599 on a v6e (benchmarks/tpu_schedule.py, compile-only). At every d of the
    # grid two heads and 16 mini-batches a step beat one and 8 (v5p, bf16, forward at b = 16
    # / 64: d = 16 236.5 -> 210.6 / 403.1 -> 349.9, d = 32 304.0 -> 279.3 / 467.8 -> 417.1,
    # d = 128 1,124.9 -> 1,090.4 / 1,365.2 -> 1,319.4; backward 0.3-2.5% fewer;
    # benchmarks/results/tpu-compile-only-block-sizes.jsonl). Four heads save 1-3% more but
    # leave 3 grid steps of 12 heads for a v5p's two TensorCores.
    # At d = 128 [b, d] tiles (a token a row) beat [d, b] ones: bundles a forward / backward
    # mini-batch at b = 16 and 64, v5p bf16: 1,080 -> 754 / 3,226 -> 2,345 and 1,309 ->
    # 1,244 / 4,052 -> 3,728; v5e and v6e alike (backward at b = 64 on a v6e: a tie); at
    # d <= 64 "db" wins or ties (d = 64, b = 64: 635 / 1,773 against 862 / 2,508).
    # The forward's two heads in one mini-batch loop (`interleave_heads`) take 2-12% fewer
    # bundles than a loop each at d <= 64 on v5p, v5e and v6e (v5p, b = 16 / 64: d = 16 210.6
    # -> 201.4 / 349.9 -> 337.8, d = 32 279.3 -> 258.8 / 417.1 -> 378.6, d = 64 470.3 -> 457.7
    # / 635.3 -> 605.7), 1-8% more at d = 128 ("bd": 754.2 -> 815.5 / 1,243.9 -> 1,306.8).
    # A v5e or v6e chip has one TensorCore, so 12 heads in steps of 4 lose no parallelism
    # there: 4 heads a step take 6-11% fewer forward bundles than 2 at d <= 32 (v6e also at
    # d = 64: 418.8 -> 385.1 / 571.0 -> 525.6 at b = 16 / 64; v5e 469.9 -> 441.3 / 605.4 ->
    # 596.1), 0.3-2% at d = 128, and 0-0.8% fewer backward ones (+0.2% at most at d = 128).
    (("TPU v5 lite", None, 128), _ONE_CORE_128),  # untuned
    (("TPU v5e", None, 128), _ONE_CORE_128),  # untuned
    (("TPU v5 lite", None, None), _ONE_CORE),  # untuned
    (("TPU v5e", None, None), _ONE_CORE),  # untuned
    # A v5p's two TensorCores split the grid's parallel steps: 12 heads in 3s make 4 steps, 2
    # a core, as 2s made 6 (3 a core), and 3 heads in one forward loop take 1.6-9.5% fewer
    # bundles than 2 at d <= 64 (d = 16, b = 64: 337.8 -> 305.8; d = 64, b = 64: 605.7 ->
    # 595.9), backward 0-0.8%. At d = 128 (no interleaving) it keeps 2, within its 64 MiB.
    (("TPU v5", None, 128), _TPU_128),  # untuned
    (("TPU v6", None, 128), _ONE_CORE_128),  # untuned
    (("TPU v5", None, None), _V5P),  # untuned
    (("TPU v6", None, None), _ONE_CORE),  # untuned
    # A v4 takes `DEFAULT`, one head a step: its TensorCore has 16 MiB of VMEM
    # (`VMEM_CAPACITY`), and the backward needs about 7.2 MiB at g = 16 on bf16 inputs.
)


# A TensorCore's VMEM by device kind prefix (first match wins), as libtpu states it when a
# kernel overflows (compile-only: "Used 22.18M of 16.00M vmem" on a v4, "of 63.94M" on a v5p,
# "of 128.00M" on a v5e, "of 127.94M" on a v6e), matching jax's `pltpu.get_tpu_info`.
VMEM_CAPACITY: tuple[tuple[str, int], ...] = (
    ("TPU v4", 16 << 20), ("TPU v5 lite", 128 << 20), ("TPU v5e", 128 << 20),
    ("TPU v5", 64 << 20), ("TPU v6", 128 << 20), ("TPU7", 64 << 20),
)


def vmem_capacity(device_kind: str) -> int | None:
  """Bytes of VMEM a TensorCore of this device kind has (None: not a TPU we know)."""
  for prefix, capacity in VMEM_CAPACITY:
    if device_kind.lower().startswith(prefix.lower()):
      return capacity
  return None


def get_block_sizes(device_kind: str, dtype, head_dim: int) -> BlockSizes:
  """The table entry for this device kind, input dtype and head dim, else `DEFAULT`."""
  name = jnp.dtype(dtype).name
  for (kind, want_dtype, want_d), sizes in TABLE:
    if (device_kind.lower().startswith(kind.lower()) and want_dtype in (None, name)
        and want_d in (None, head_dim)):
      return sizes
  return DEFAULT
