"""Mosaic GPU pieces shared by the cluster kernels (`gpu_cluster.py` forward,
`gpu_cluster_backward.py` backward): wgmma matmuls on shared-memory operands, the cluster's
barriers and partial sums, the [b, d] rows a CTA computes (`Rows`), row statistics, and
`mini_batch`, the forward half of one TTT-MLP mini-batch on a CTA's slice of the hidden width
(see `gpu_cluster.py` for the split and why it is exact).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import fragmented_array as mgpu_fa
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.ttt import mosaic_compat
from ttt_jax.ops.ttt import gelu_tanh_and_grad, gelu_tanh_grad2

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


def cluster_kernel(body, name, *, out_type, scratch, grid, cluster, interpret, debug):
  """`plgpu.kernel` over grid (batch, heads), a cluster of `cluster` CTAs per (batch, head):
  body(*input and output refs, scratch refs), named `name` in the lowered module; `interpret`
  False or a `plgpu.InterpretGPUParams`. Math is approximate (`approx_math`: tanh, rsqrt and
  exp as one hardware instruction each; tanh's relative error is about 2^-11, the others' far
  less, all under the bf16 rounding of the wgmma operands; 22% fewer instructions in the
  forward's loop)."""
  def kernel(*refs):
    body(*refs[:-len(scratch)], refs[-len(scratch):])
  kernel.__name__ = name
  return plgpu.kernel(kernel, out_type=out_type, scratch_types=scratch, grid=grid,
                      grid_names=("batch", "heads"), cluster=(cluster,),
                      cluster_names=("cluster",), interpret=interpret or None, debug=debug,
                      compiler_params=plgpu.CompilerParams(approx_math=True))


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


@plgpu.inline_mgpu()
def cluster_sync(ctx):
  """All threads of the cluster's CTAs meet; each CTA's earlier shared-memory writes are then
  visible to the others (release/acquire at cluster scope, as CUTLASS's cluster_sync)."""
  del ctx
  mgpu_utils.inline_ptx("barrier.cluster.arrive.release.aligned;", has_side_effects=True)
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


# The row statistics below restate `ttt_jax.ops.ttt.layer_norm` / `ln_l2_grad` with reductions
# to [b] and `broadcast_in_dim` back, because Mosaic GPU's layout inference finds no layout for
# their keepdims [b, 1] intermediates (tried: "Layout inference failed to find a solution").
# The tests hold them to the pure op.
def normalize(z, eps):
  """(z - mean) * rstd per row, and rstd [b]."""
  d = z.shape[1]
  mu = z.sum(axis=1) / d
  zc = z - rows(mu, z.shape)
  rstd = lax.rsqrt((zc * zc).sum(axis=1) / d + eps)
  return zc * rows(rstd, z.shape), rstd


def ln_backward(x_hat, rstd, u):
  """The cotangent of z given u, the cotangent of x_hat = LN(z) without the affine map:
  rstd * (u - mean(u) - x_hat * mean(u * x_hat)) per row."""
  d = x_hat.shape[1]
  mean = lambda v: rows(v.sum(axis=1) / d, x_hat.shape)
  return rows(rstd, x_hat.shape) * (u - mean(u) - x_hat * mean(u * x_hat))


def ln_l2_grad(z, target, gamma, beta, eps):
  """`ttt_jax.ops.ttt.ln_l2_grad` with row reductions as WGMMA-layout sums."""
  x_hat, rstd = normalize(z, eps)
  u = (cols(gamma, z.shape) * x_hat + cols(beta, z.shape) - target) * cols(gamma, z.shape)
  return ln_backward(x_hat, rstd, u)


class Cluster:
  """The P CTAs of one (batch, head): cluster-wide barriers and sums of per-CTA partials.

  Partials are published in shared-memory buffers, `buf(key)`, and read by the peers through
  distributed shared memory (`plgpu.cluster_ref`) after a cluster barrier. A buffer may be
  written again once this CTA has passed a later barrier than the one the peers read it behind
  (they arrive there after reading), which is how the kernels choose their keys; a CTA must not
  exit while its peers may still read it (a barrier after the loop). Interpreter: the partials
  go through the global-memory scratch `xch(key, peer)` and are fetched into `recv(key)` (it
  has no distributed shared memory); `share` goes through `xch_rows(j, peer)`.
  """

  def __init__(self, c, size, interpret, cbar, recv_bar, buf, xch, recv, xch_rows):
    self.c, self.size, self.interpret = c, size, interpret
    self.cbar, self.recv_bar, self.buf, self.xch, self.recv = cbar, recv_bar, buf, xch, recv
    self.xch_rows = xch_rows

  def sync(self):
    if self.interpret:  # the interpreter models cluster barriers, not inline PTX
      plgpu.barrier_arrive(self.cbar)
      plgpu.barrier_wait(self.cbar)
    else:
      cluster_sync()

  def sum(self, *parts):
    """(key, value, layout) partials -> their sums over the cluster, after one barrier. With a
    `Rows` for the layout, the sum of rows.ds only, in rows.layout (value: all b rows). A
    callable value is computed just before it is published (its registers are live only
    there); None: already written to buf(key) (with a `Rows` layout only)."""
    published = []
    for key, value, layout in parts:
      value = value() if callable(value) else value
      if value is None:
        assert isinstance(layout, Rows), "only Rows sums read their own part back"
      else:
        self.buf(key)[...] = value
      published.append((key, value, layout))
    parts = published
    if self.interpret:
      plgpu.commit_smem()
      for key, _, _ in parts:
        plgpu.copy_smem_to_gmem(self.buf(key), self.xch(key, self.c))
      plgpu.wait_smem_to_gmem(0)
    self.sync()
    totals = []
    for key, value, layout in parts:
      sliced = lambda ref: ref
      if isinstance(layout, Rows):  # the own rows from shared memory, in the rows' layout
        sliced = lambda ref, ds=layout.ds: ref.at[ds]
        value, layout = plgpu.load(sliced(self.buf(key)), layout=layout.layout), layout.layout
      total = value
      for k in range(1, self.size):
        peer = lax.rem(self.c + k, self.size)
        if self.interpret:
          plgpu.copy_gmem_to_smem(self.xch(key, peer), self.recv(key), self.recv_bar)
          plgpu.barrier_wait(self.recv_bar)
          total = total + plgpu.load(sliced(self.recv(key)), layout=layout)
          plgpu.commit_smem()  # this read before the next copy into recv (async proxy)
        else:
          peer_buf = plgpu.cluster_ref(self.buf(key), {"cluster": peer})
          total = total + plgpu.load(sliced(peer_buf), layout=layout)
      totals.append(total)
    return totals

  def share(self, rows: Rows, *pairs):
    """wgmma operands of which this CTA computed rows.ds, (ref, value) pairs: each CTA writes
    its rows into its own ref and, after a cluster barrier, copies its peers' rows from theirs
    (distributed shared memory; Mosaic GPU lowers loads from a peer's shared memory, not
    stores), so every ref holds all b rows."""
    for ref, value in pairs:
      ref.at[rows.ds][...] = value.astype(ref.dtype)
    if self.interpret:
      plgpu.commit_smem()
      for j, (ref, _) in enumerate(pairs):
        plgpu.copy_smem_to_gmem(ref.at[rows.ds], self.xch_rows(j, self.c))
      plgpu.wait_smem_to_gmem(0)
    self.sync()
    n = rows.ds.size
    received = []
    for k in range(1, self.size):
      peer = lax.rem(self.c + k, self.size)
      theirs = pl.ds(pl.multiple_of(peer * n, n), n)
      for j, (ref, _) in enumerate(pairs):
        if self.interpret:  # recv_bar counts one arrival
          fetch([(self.xch_rows(j, peer), ref.at[theirs])], self.recv_bar)
        else:
          peer_ref = plgpu.cluster_ref(ref, {"cluster": peer})
          received.append((ref.at[theirs], plgpu.load(peer_ref.at[theirs], layout=rows.layout)))
    # Every peer's load is issued before the first store waits on one: each is a round trip
    # through the SM-to-SM network (~200 clocks), and the warpgroup barriers Mosaic GPU puts
    # around shared-memory stores would otherwise serialise them (P - 1 round trips, not one).
    for ref, value in received:
      ref[...] = value
    plgpu.commit_smem()


def stage(*pairs):
  """wgmma operands computed in registers, (ref, value) pairs, written to shared memory and
  fenced once (wgmma reads them there; jax's interpreter takes only shared-memory operands)."""
  for ref, value in pairs:
    ref[...] = value.astype(ref.dtype)
  plgpu.commit_smem()


class Recompute(NamedTuple):
  """What `mini_batch` computes, the registers (f32) the backward differentiates through; the
  [., d] ones hold the CTA's `Rows`."""
  Z2: jax.Array  # [rows, d] X2 W2 + b2, summed over the cluster
  G2: jax.Array  # [rows, d] the LayerNorm-L2 gradient of Z2
  Z2_bar: jax.Array | None  # [rows, d], summed over the cluster (None: output=False)
  db1: jax.Array | None  # [fp] colsum(eta G1) (the forward's only)
  db2: jax.Array | None  # [d] colsum(eta G2), summed over the cluster (in Rows.col)
  W1: jax.Array | None  # [d, fp] the updated state (the forward's only)
  W2: jax.Array | None  # [fp, d]


def mini_batch(s, b1, b2, eps, cl, block, state=None, stepped=None, interpret=False,
               before_stage=None, during_z1=lambda: None, output=True, w2_transposed=False):
  """One mini-batch of the split TTT-MLP up to Z2_bar (`tile.step` rearranged, see
  `gpu_cluster.py`'s docstring), on the CTA's hidden slice and `block`, its rows of the [b, d]
  work (`Rows`). Z1_bar and Z2_bar are f(XQ; W') with the stepped state W' (the primal form:
  with no causal mask inside the mini-batch the pure op's dual form computes the same with two
  more [b, b] matmuls).

  s: shared-memory buffers with xq, xk, xv [b, d] (bf16) and eta [b] (f32) loaded, w1 [d, fp],
  w2 [fp, d] (bf16) staged; written here: x2, x2_bar, neg_eg1 [b, fp] (-eta G1: every product
  with it is subtracted, so each is one accumulator), neg_eg2 [b, d] (all b rows,
  `Cluster.share`), and for the backward g2 [b, d], attn [b, b] (XQ XK^T), and parked for the
  VJP (not returned): dx2 [b, fp] (gelu'(Z1)), q [b, fp] (Q), g1 [b, fp] (G1, f32) and d1
  [b, fp] (gelu'(Z1_bar)); ln [2, d] f32: gamma and beta, loaded where used. b1 [fp] (COL),
  b2 [d] (block.col): f32 registers. cl: the `Cluster` (slots 0, 1 and "db2"). interpret: a
  `plgpu.InterpretGPUParams` or False.

  The forward passes state, its (W1, W2), f32 [d, fp], [fp, d] in registers (WGMMA), whose
  bf16 copies s.w1, s.w2 hold (w2_transposed: W2^T [d, fp] in both, so that W2's step is a
  wgmma tile of d = 64 rows when fp = 32, at cluster = 8; s.w2_new too): the gradient
  step is taken on them (Recompute's W1, W2) and the new ones staged over s.w1, s.w2 (after
  before_stage(), if given). during_z1(): work that needs none of this, run while Z1's matmul
  is (the forward's loads of the next mini-batch).
  output=False: the state's step alone, for the backward's recompute, without Z1_bar and
  Z2_bar (two of the seven matmuls, gelu(Z1_bar), the [b, d] sum; db2 is summed alone, so the
  cluster barriers stay the same).

  The backward passes stepped instead, (b1', b2'), with W1', W2' (the state after this
  mini-batch, which it has at hand) staged in s.w1_new, s.w2_new: the step is not taken again.
  Z1_bar's product runs with Z1's, gelu(Z1_bar) during X2 W2 and X2_bar W2' with G2 W2^T;
  gelu'(Z1), gelu''(Z1) come from the tanh of gelu(Z1), so Z1 and the tanh die at once.
  """
  backward = state is None
  assert backward == (stepped is not None), "the forward passes state, the backward stepped"
  assert output or not backward, "the backward recomputes the output"
  b, d = s.xq.shape
  fp = s.w1.shape[1]
  bf, bd, rd = (b, fp), (b, d), (block.ds.size, d)
  T = lambda ref: ref.transpose((1, 0))
  # W2 [fp, d] and W2^T [d, fp] as wgmma operands, and W2's step -X2^T eG2 (its transpose
  # -eG2^T X2 when the state holds W2^T).
  w2, w2_t = (T(s.w2), s.w2) if w2_transposed else (s.w2, T(s.w2))
  w2_step = (T(s.neg_eg2), s.x2) if w2_transposed else (T(s.x2), s.neg_eg2)

  # Z1 = XK W1 + b1; X2 = gelu(Z1); Z2 = X2 W2 + b2 (summed over the cluster).
  def gelu(Z1):
    Z1 = Z1 + cols(b1, bf)  # [b, fp]
    X2, dX2 = gelu_tanh_and_grad(Z1)  # dX2 (gelu'(Z1)) is live instead of Z1
    stage((s.x2, X2))
    return dX2, gelu_tanh_grad2(Z1) if backward else None
  def first(done):  # during_z1 while Z1 is computed, then gelu
    during_z1()
    return gelu(done(0))
  if backward:  # and XQ XK^T (its VJP's Gram matrix), Z1_bar = XQ W1' + b1'
    (dX2, ddX2), (_, attn, Z1_bar) = matmul_during(
        [(bf, [(s.xk, s.w1)]), ((b, b), [(s.xq, s.xk.transpose((1, 0)))]),
         (cols(stepped[0], bf), [(s.xq, s.w1_new)])], first, interpret)
  else:
    (dX2, ddX2), _ = matmul_during([(bf, [(s.xk, s.w1)])], first)
  def loss_inputs(done):  # the rows' inputs of the loss, loaded while X2 W2 is computed
    if backward:  # (and XQ XK^T, gelu(Z1_bar) staged, gelu'(Z1_bar) parked)
      X2_bar, dX2_bar = gelu_tanh_and_grad(Z1_bar)
      stage((s.attn, attn), (s.x2_bar, X2_bar))
      s.d1[...] = dX2_bar.astype(s.d1.dtype)
    ln = lambda k: load_col(s.ln.at[k], block.col)
    return (load_rows(s.xv, block) - load_rows(s.xk, block),
            plgpu.load(s.eta.at[block.ds], layout=block.row), ln(0), ln(1), done(0))
  (target, eta, gamma, beta, part), _ = matmul_during([(bd, [(s.x2, w2)])], loss_inputs)
  Z2, = cl.sum((0, part, block))
  Z2 = Z2 + cols(b2, rd)  # [rows, d]

  # Gradients of the reconstruction loss: G2 = dl/dZ2 on the CTA's rows, G1 = dl/dZ1.
  G2 = ln_l2_grad(Z2, target, gamma, beta, eps)
  eG2 = rows(eta, rd) * G2
  if backward:  # the VJP wants G1 and Q, so G2 is shared too
    cl.share(block, (s.neg_eg2, -eG2), (s.g2, G2))

    def g1(done):  # while G2 W2^T is computed
      P = done(0)
      G1 = P * dX2
      # Parked in shared memory (the VJP's uses are far off): gelu'(Z1), G1 and Q.
      s.dx2[...] = dX2.astype(s.dx2.dtype)
      s.q[...] = (P * ddX2).astype(s.q.dtype)
      s.g1[...] = G1
      stage((s.neg_eg1, -(rows(plgpu.load(s.eta, layout=ROW), bf) * G1)))
    # Z2_bar = X2_bar W2' + b2', with G2 W2^T
    w2_new = T(s.w2_new) if w2_transposed else s.w2_new
    _, (_, part) = matmul_during([(bf, [(s.g2, w2_t)]), (bd, [(s.x2_bar, w2_new)])], g1,
                                 interpret)
    Z2_bar, = cl.sum((1, part, block))
    return Recompute(Z2, G2, Z2_bar + cols(stepped[1], rd), None, None, None, None)

  # The forward: eta scales rows, eta G1 = ((eta G2) W2^T) gelu'(Z1), and G2 is not needed.
  cl.share(block, (s.neg_eg2, -eG2))
  W1, W2 = state
  if not output:  # the step alone: W2's during eta G1, W1's while W2' is staged
    def g1(done):
      neg_eG1 = done(0) * dX2
      stage((s.neg_eg1, neg_eG1))
      return neg_eG1, eG2.sum(axis=0)  # and db2 [d] on the CTA's rows
    (neg_eG1, db2), (_, W2) = matmul_during(
        [(bf, [(s.neg_eg2, w2_t)]), (W2, [w2_step])], g1, interpret)
    def w2_new(done):
      if before_stage:
        before_stage()
      stage((s.w2, W2))
      return -neg_eG1.sum(axis=0)  # db1 [fp]
    db1, (W1,) = matmul_during([(W1, [(s.xk.transpose((1, 0)), s.neg_eg1)])], w2_new,
                               interpret)
    stage((s.w1, W1))
    db2, = cl.sum(("db2", db2, block.col))
    return Recompute(Z2, G2, None, db1, db2, W1, W2)
  neg_eG1 = matmul(bf, (s.neg_eg2, w2_t)) * dX2
  stage((s.neg_eg1, neg_eG1))

  # W1' = W1 - XK^T eG1, b1' = b1 - colsum(eG1) (db1, summed while W1' is computed), and
  # Z1_bar = XQ W1' + b1'; W2' = W2 - X2^T eG2 during gelu(Z1_bar).
  colsum = lambda done: -neg_eG1.sum(axis=0)  # db1 [fp]
  db1, (W1,) = matmul_during([(W1, [(s.xk.transpose((1, 0)), s.neg_eg1)])], colsum, interpret)
  if before_stage:
    before_stage()
  stage((s.w1, W1))

  def gelu_bar(done):
    stage((s.x2_bar, gelu_tanh_and_grad(done(0))[0]))
  _, (_, W2) = matmul_during([(cols(b1 - db1, bf), [(s.xq, s.w1)]),
                              (W2, [w2_step])], gelu_bar, interpret)
  stage((s.w2, W2))
  # (db2 [d], over the CTA's rows, is summed while Z2_bar's product is computed.)
  db2, (part,) = matmul_during([(bd, [(s.x2_bar, w2)])], lambda done: eG2.sum(axis=0),
                               interpret)
  Z2_bar, db2 = cl.sum((1, part, block), ("db2", db2, block.col))
  return Recompute(Z2, G2, Z2_bar + cols(b2 - db2, rd), db1, db2, W1, W2)
