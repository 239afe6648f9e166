"""Mosaic GPU pieces shared by the cluster kernels (`gpu_cluster.py` forward,
`gpu_cluster_backward.py` backward): wgmma matmuls on shared-memory operands, the cluster's
barriers and partial sums, and the [b, d] rows a CTA computes (`Rows`). The TTT math they run
on a CTA's slice of the hidden width (`mini_batch`, the row statistics) is
`gpu_cluster_step.py`, and the backward's VJP of it `gpu_cluster_vjp.py`.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import fragmented_array as mgpu_fa
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.ttt import mosaic_compat

mosaic_compat.apply()  # peer refs with offsets on jax 0.11 (the lent GPU image's)

WGMMA = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a WGMMA tile: [b]
COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column: [n]

# Shared memory per block on Hopper (H100, H200): 227 KiB with the opt-in.
SMEM_LIMIT_BYTES = 227 << 10
# Mosaic GPU's own shared memory beside the scratch list (cross-warp reductions), measured by
# compiling for an H100 at d = 64 (benchmarks/results/h100-compile-only-resources.jsonl): 6.2
# KiB in the forward, 13.4 and 13.8 KiB in the backward on 4 and 8 CTAs a head (180,224 and
# 230,400 B asked for).
MOSAIC_RESERVE_BYTES = 14 << 10


def swizzled(shape, dtype, swizzle=None):
  """A shared-memory tile laid out for wgmma operands: `swizzle` bytes (default: the widest its
  rows allow, 128 at 64 bf16 columns). A wgmma's two operands need the same swizzle, so a
  kernel with [., 32] bf16 operands (the hidden slice at cluster = 8) uses 64 for all."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = swizzle or plgpu.find_swizzle(shape[-1] * itemsize * 8)
  transforms = (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))
  return plgpu.SMEM(shape, dtype, transforms=transforms)


def cluster_kernel(body, name, *, out_type, scratch, grid, cluster, interpret, debug,
                   warpgroups=1):
  """`plgpu.kernel` over grid (batch, heads), a cluster of `cluster` CTAs per (batch, head),
  each of `warpgroups` warpgroups (axis "wg" where more than one; the scratch is the CTA's):
  body(*input and output refs, scratch refs), named `name` in the lowered module; `interpret`
  False or a `plgpu.InterpretGPUParams`. Math is approximate (`approx_math`: tanh, rsqrt and
  exp as one hardware instruction each; tanh's relative error is about 2^-11, the others' far
  less, all under the bf16 rounding of the wgmma operands; 22% fewer instructions in the
  forward's loop)."""
  def kernel(*refs):
    body(*refs[:-len(scratch)], refs[-len(scratch):])
  kernel.__name__ = name
  threads = {} if warpgroups == 1 else {"num_threads": warpgroups, "thread_name": "wg"}
  return plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch, grid=grid,
                      grid_names=("batch", "heads"), cluster=(cluster,),
                      cluster_names=("cluster",), interpret=interpret or None, debug=debug,
                      compiler_params=plgpu.CompilerParams(approx_math=True), **threads)


def fetch(pairs, barrier, wait=True):
  """TMA copies of (GMEM src, SMEM dst) pairs, all arriving on `barrier`; waits unless told."""
  for src, dst in pairs:
    plgpu.copy_gmem_to_smem(src, dst, barrier)
  if wait:
    plgpu.barrier_wait(barrier)


def matmul(shape, *products):
  """The sum of a @ b over the (a, b) products on the tensor cores (wgmma), f32 [m, n]; a and b
  are shared-memory refs (transposed views allowed)."""
  def body(acc_ref):
    for a, b in products:
      plgpu.wgmma(acc_ref, a, b)
    plgpu.wgmma_wait(0)
    return acc_ref[...]
  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def matmul_during(pairs, work=None, interpret=False):
  """[(acc, products), ...]: the sum of each pair's (a, b) products, f32, plus acc (an f32
  [m, n] in the WGMMA layout, accumulated in its registers: no separate adds) or from zero (acc
  a shape), issued in order to the tensor cores while `work`(done) runs on the CUDA cores;
  done(k) waits for pair k's sum only (the later pairs may still run) and returns it. Returns
  (work's result, the sums). Hides matmuls behind work that does not need them instead of
  waiting on each. `interpret`: jax's GPU interpreter cannot store into an accumulator, so with
  an acc there the sums are computed first and added."""
  inits = [None if isinstance(acc, tuple) else acc for acc, _ in pairs]
  work = work or (lambda done: None)
  if interpret and any(v is not None for v in inits):
    sums = [matmul(acc if v is None else v.shape, *products) + (0 if v is None else v)
            for v, (acc, products) in zip(inits, pairs)]
    return work(lambda k: sums[k]), sums

  def body(*accs):
    for acc, init, (_, products) in zip(accs, inits, pairs):
      if init is not None:
        acc[...] = init
      for a, b in products:
        plgpu.wgmma(acc, a, b)
    later = lambda k: sum(len(products) for _, products in pairs[k + 1:])
    out = work(lambda k: plgpu.wgmma_accumulator_load(accs[k], wait_n=later(k)))
    return out, [plgpu.wgmma_accumulator_load(acc, wait_n=0) for acc in accs]
  shapes = [acc if v is None else v.shape for v, (acc, _) in zip(inits, pairs)]
  return pl.run_scoped(body, *(plgpu.ACC(shape, jnp.float32) for shape in shapes))


# A cluster barrier in two halves (as CUTLASS's cluster_arrive / cluster_wait): all threads of
# the cluster's CTAs arrive, then wait for the others; each CTA's shared-memory writes before
# its arrival are visible to the others after their wait (release/acquire at cluster scope).
# Work between the two overlaps the barrier's round trip.
@plgpu.inline_mgpu()
def cluster_arrive(ctx):
  del ctx
  mgpu_utils.inline_ptx("barrier.cluster.arrive.release.aligned;", has_side_effects=True)


@plgpu.inline_mgpu()
def cluster_wait(ctx):
  del ctx
  mgpu_utils.inline_ptx("barrier.cluster.wait.acquire.aligned;", has_side_effects=True)


class Rows(NamedTuple):
  """The rows of a mini-batch's [b, d] work (LayerNorms, the LayerNorm-L2 gradient, the
  output) that one CTA computes, and their register layouts (`row_block`).

  CTA c computes rows c*b/P .. (c+1)*b/P - 1 only (16 at P = 4, 8 at P = 8), spread over the
  CTA's 128 threads (8 or 4 values a thread: `ROW_LAYOUTS`), so the cluster does each row once
  and shares the results through distributed shared memory (`Cluster.sum`, `Cluster.share`).
  Done redundantly by every CTA in the WGMMA layout (32 values a thread at b = d = 64), this
  work took a quarter of the forward's loop instructions and a third of the backward's.
  """
  ds: pl.Slice  # the rows, a slice of [b]
  layout: plgpu.SomeLayout  # [rows, d]
  row: plgpu.SomeLayout  # [rows]: a value per row
  col: plgpu.SomeLayout  # [d]: a value per column


# Rows per CTA -> their layout over a warpgroup at d = 64, lanes in vectors of 4 columns, each
# vector inside one 32-column half (the tiles' swizzle atoms: 64-byte rows at a 64-byte swizzle).
# 16 rows: warp w takes rows 4w .. 4w+3, 8 lanes a row, and each lane two vectors 32 apart (4
# f32 = one 16-byte shared-memory access; 8 lanes cover 128 contiguous bytes of a row:
# conflict-free). 8 rows: warp w takes rows 2w, 2w + 1, 16 lanes a row, one vector a lane. Row
# sums: in-thread adds and shuffles; column sums cross the warps through shared memory.
ROW_LAYOUTS = {
    16: plgpu.Layout.TILED(mgpu_fa.Tiling(((16, 64), (4, 64), (4, 32), (4,))),
                           warp_dims=(-7,), lane_dims=(-3, -2), vector_dim=-1),
    8: plgpu.Layout.TILED(mgpu_fa.Tiling(((8, 64), (2, 64), (2, 32), (4,))),
                          warp_dims=(-7,), lane_dims=(-4, -3, -2), vector_dim=-1),
}


def row_block(c, b: int, d: int, cluster: int) -> Rows:
  """CTA c's block of b / cluster rows (d = 64; 16 or 8 rows: `ROW_LAYOUTS`)."""
  n = b // cluster
  if b % cluster or n not in ROW_LAYOUTS or d != 64:
    raise ValueError(f"row_block: b={b}, d={d}, cluster={cluster}; needs d = 64 and b / "
                     f"cluster in {sorted(ROW_LAYOUTS)}")
  layout = ROW_LAYOUTS[n]
  return Rows(pl.ds(pl.multiple_of(c * n, n), n), layout, layout.reduce(1), layout.reduce(0))


def load_rows(ref, rows: Rows):
  """rows.ds of a [b, n] shared-memory ref, in rows.layout, as f32."""
  return plgpu.load(ref.at[rows.ds], layout=rows.layout).astype(jnp.float32)


def load_col(ref, layout=COL):
  """A [n] shared-memory vector into registers, one value per column of a WGMMA tile (n / 4
  registers per thread: load it where it is used rather than keep it live), or of `layout`
  (`Rows.col`)."""
  return plgpu.load(ref, layout=layout)


def rows(v, shape):  # [m] -> [m, n]
  return lax.broadcast_in_dim(v, shape, [0])


def cols(v, shape):  # [n] -> [m, n]
  return lax.broadcast_in_dim(v, shape, [1])


class Cluster:
  """The P members of one (batch, head), each a slice of the hidden width: cluster-wide
  barriers and sums of per-member partials. A member is a CTA or, with W warpgroups a CTA
  (`warpgroups`), one warpgroup: member c is warpgroup c % W of CTA c // W.

  Partials are published in shared-memory buffers, `buf(key, w)` (warpgroup w's of this CTA),
  and read by the peers after a cluster barrier: a peer CTA's through distributed shared memory
  (`plgpu.cluster_ref`), the other warpgroup's of the same CTA directly. A buffer may be written
  again once this member has passed a later barrier than the one the peers read it behind (they
  arrive there after reading), which is how the kernels choose their keys; a CTA must not exit
  while its peers may still read it (a barrier after the loop). `share`'s tiles are
  `shared(name, w)`. Interpreter: the partials go through the global-memory scratch `xch(key,
  member)` and are fetched into `recv(key)` (it has no distributed shared memory); `share` goes
  through `xch_rows(j, member)`.
  """

  def __init__(self, c, size, interpret, cbar, recv_bar, buf, xch, recv, xch_rows, shared,
               warpgroups=1):
    self.c, self.size, self.interpret = c, size, interpret
    self.cbar, self.recv_bar, self.buf, self.xch, self.recv = cbar, recv_bar, buf, xch, recv
    self.xch_rows, self.shared, self.W = xch_rows, shared, warpgroups
    self.w = lax.rem(c, warpgroups) if warpgroups > 1 else 0

  def sync(self, during=None):
    """A cluster barrier; during(), work that reads nothing the peers write before it, runs
    between this member's arrival and its wait (hiding the round trip): its result."""
    if self.interpret:  # the interpreter models cluster barriers, not inline PTX
      plgpu.barrier_arrive(self.cbar)
    else:  # (barrier.cluster counts every thread of the cluster: all warpgroups meet)
      cluster_arrive()
    out = during() if during else None
    if self.interpret:
      plgpu.barrier_wait(self.cbar)
    else:
      cluster_wait()
    return out

  def peers(self):
    """The other members as (member index, ref_of), ref_of(view) mapping a buffer view
    view(w) -> warpgroup w's buffer to that member's: the peers' distributed shared memory (a
    load from it is a round trip through the SM-to-SM network) or the sibling warpgroup's
    (the compiled path's; the interpreter exchanges through global memory by member index)."""
    W, P = self.W, self.size // self.W
    cta = lax.div(self.c, W) if W > 1 else self.c
    if W > 1:  # the sibling warpgroups of this CTA first (a local read)
      for k in range(1, W):
        w = lax.rem(self.w + k, W)
        yield cta * W + w, lambda view, w=w: view(w)
    for j in range(1, P):
      peer = lax.rem(cta + j, P)
      for w in range(W):
        yield peer * W + w, lambda view, w=w, peer=peer: plgpu.cluster_ref(
            view(w), {"cluster": peer})

  def sum(self, *parts, during=None):
    """(key, value, layout) partials -> their sums over the cluster, after one barrier. With a
    `Rows` for the layout, the sum of rows.ds only, in rows.layout (value: all b rows). A
    callable value is computed just before it is published (its registers are live only
    there); None: already written to buf(key) (with a `Rows` layout only). during(): work run
    inside the barrier (`sync`), its result appended to the sums."""
    own = lambda key: self.buf(key, self.w)
    published = []
    for key, value, layout in parts:
      value = value() if callable(value) else value
      if value is None:
        assert isinstance(layout, Rows), "only Rows sums read their own part back"
      else:
        own(key)[...] = value
      published.append((key, value, layout))
    parts = published
    if self.interpret:
      plgpu.commit_smem()
      for key, _, _ in parts:
        plgpu.copy_smem_to_gmem(own(key), self.xch(key, self.c))
      plgpu.wait_smem_to_gmem(0)
    out = self.sync(during)
    totals = []
    for key, value, layout in parts:
      sliced = lambda ref: ref
      if isinstance(layout, Rows):  # the own rows from shared memory, in the rows' layout
        sliced = lambda ref, ds=layout.ds: ref.at[ds]
        value, layout = plgpu.load(sliced(own(key)), layout=layout.layout), layout.layout
      total = value
      for peer, ref_of in self.peers():
        if self.interpret:
          plgpu.copy_gmem_to_smem(self.xch(key, peer), self.recv(key), self.recv_bar)
          plgpu.barrier_wait(self.recv_bar)
          total = total + plgpu.load(sliced(self.recv(key)), layout=layout)
          plgpu.commit_smem()  # this read before the next copy into recv (async proxy)
        else:
          peer_buf = ref_of(lambda w, key=key: self.buf(key, w))
          total = total + plgpu.load(sliced(peer_buf), layout=layout)
      totals.append(total)
    return totals if during is None else [*totals, out]

  def share(self, rows: Rows, *pairs, during=None):
    """wgmma operands of which this member computed rows.ds, (name, value) pairs: each member
    writes its rows into its own tile, shared(name, w), and, after a cluster barrier, copies
    its peers' rows from theirs (distributed shared memory; Mosaic GPU lowers loads from a
    peer's shared memory, not stores), so every tile holds all b rows. during(): work run
    inside the barrier (`sync`); its result is returned."""
    tile = lambda name: self.shared(name, self.w)
    for name, value in pairs:
      tile(name).at[rows.ds][...] = value.astype(tile(name).dtype)
    if self.interpret:
      plgpu.commit_smem()
      for j, (name, _) in enumerate(pairs):
        plgpu.copy_smem_to_gmem(tile(name).at[rows.ds], self.xch_rows(j, self.c))
      plgpu.wait_smem_to_gmem(0)
    out = self.sync(during)
    n = rows.ds.size
    theirs = lambda peer: pl.ds(pl.multiple_of(peer * n, n), n)
    received = []
    for peer, ref_of in self.peers():
      for j, (name, _) in enumerate(pairs):
        if self.interpret:  # recv_bar counts one arrival
          fetch([(self.xch_rows(j, peer), tile(name).at[theirs(peer)])], self.recv_bar)
        else:
          peer_ref = ref_of(lambda w, name=name: self.shared(name, w))
          received.append((tile(name).at[theirs(peer)],
                           plgpu.load(peer_ref.at[theirs(peer)], layout=rows.layout)))
    # Every peer's load is issued before the first store waits on one: each is a round trip
    # through the SM-to-SM network (~200 clocks), and the warpgroup barriers Mosaic GPU puts
    # around shared-memory stores would otherwise serialise them (P - 1 round trips, not one).
    for ref, value in received:
      ref[...] = value
    plgpu.commit_smem()
    return out


def stage(*pairs):
  """wgmma operands computed in registers, (ref, value) pairs, written to shared memory and
  fenced once (wgmma reads them there; jax's interpreter takes only shared-memory operands)."""
  for ref, value in pairs:
    ref[...] = value.astype(ref.dtype)
  plgpu.commit_smem()
