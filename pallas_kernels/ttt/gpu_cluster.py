"""TTT-MLP forward as a Mosaic GPU kernel whose state is split across a cluster of CTAs (Hopper).

Why: at d = 64 one head's f32 state (W1 [64, 256] + W2 [256, 64], 128 KiB) plus the
mini-batch's temporaries do not fit one SM, and one program per (batch, head) leaves most SMs
idle at the 5B shape (48 heads on 132 SMs). Here the inner MLP's hidden width f = 4d is split
over a cluster of P CTAs: CTA c holds W1[:, c*f/P:(c+1)*f/P], b1's slice and W2's matching
rows, and the P CTAs of a (batch, head) walk the mini-batches together, so the grid is
B x H x P CTAs (P = 4: 192 at 48 heads) and each holds 1/P of the state. Each CTA's shared
memory (170 KiB at P = 4, 134 KiB at 8, 212 KiB in the backward) leaves room for one CTA per
SM, and each (batch, head) is one sequential chain, so 192 CTAs on an H100's 132 SMs run as
two waves, the second 45% full: expect B x H = 48 chains to take as long as 66 would (an
estimate, to be checked on a GPU). P = 8 (W2's slice, [32, 64], is held as W2^T's [64, 32]
so that its update is a wgmma tile of 64 rows: `w2_transposed`; every operand tile then has a
64-byte swizzle, as a wgmma's two operands share one, and each CTA computes 8 of the [b, d]
rows) takes 5,040 clocks a mini-batch on the latency timeline below instead of 6,355: four
fifths of the time for half the work, as the cluster exchanges, the row statistics and the
loop's fixed costs do not halve. So three waves at 8 lose to two at 4 (48 heads), and 8 wins
where its grid fits one wave (B x H <= 16, as the 12 heads a device at tensor = 4: 96 CTAs
instead of 48 on the 132 SMs): `gpu.cluster_size` picks it there, for the backward too
(`gpu_cluster_backward`: 13,708 clocks a mini-batch instead of 18,790).

The split is exact because the hidden width only meets the rest of the mini-batch through sums
over it. With X2 = gelu(XK W1 + b1), everything per hidden slice stays local (Z1, X2, G1, the
W1/b1/W2 updates, Z1_bar, X2_bar) except two [b, d] sums, exchanged through distributed shared
memory (each CTA reads its peers' partials with `plgpu.cluster_ref`) between cluster-wide
barriers (`barrier.cluster` arrive.release / wait.acquire, so the writes are visible):

  Z2     = sum_c X2_c W2_c + b2
  Z2_bar = sum_c X2_bar_c W2'_c + b2',  W2'_c = W2_c - X2_c^T (eta * G2),  b2' = b2 - colsum(eta G2)

The output is computed in the primal form, f(XQ; W') with the stepped state: with no causal
mask inside a mini-batch it equals the pure op's dual form, XQ W1' = XQ W1 - (XQ XK^T)(eta G1),
which takes two more [b, b] matmuls (the backward recomputes in the primal form too, staging
W1' and W2' for its VJP). eta scales rows, so eta G1 = ((eta G2) W2^T) gelu'(Z1) needs only
eta G2, which every CTA gets whole. The [b, d] work after each sum is split by rows
(`gpu_cluster_lib.row_block`): CTA c sums rows 16c .. 16c+15 of the partials only, computes G2
(the LayerNorm-L2 gradient of Z2) and eta G2 on them and the output XQ + LN(Z2_bar) for them, 8
values a thread; -eta G2, a wgmma operand of every CTA, is then shared (each CTA copies its
peers' rows into its own tile after a cluster barrier: `Cluster.share`), and colsum(eta G2) is
summed with Z2_bar. Done redundantly by all P CTAs in the WGMMA layout (32 values a thread)
this was a quarter of the loop. The matmuls run on the tensor cores (`wgmma`) with bf16
operands and f32 accumulation; the state stays f32 in registers (its step accumulates in them:
`gpu_cluster_lib.matmul_during`) and a bf16 copy of W1 and W2 in shared memory feeds the matmuls,
so the output differs from the f32 pure op by bf16 rounding (measured 4e-3 to 8e-3 relative).
tanh is the hardware approximation (`approx_math`, relative error about 2^-11, well under that
rounding; the interpreter computes it exactly), and gelu and gelu' share one. The math is
`tile.step` rearranged for the split; the tests compare it with the pure op. Operands
computed in registers are staged through shared memory (jax's interpreter takes only
shared-memory wgmma operands, and one code path serves both).

An estimate from the compiled code (`benchmarks/kernel_resources.py`, H100, jax 0.12.0.1): the
loop has 2,094 instructions per mini-batch and 28 HGMMA.64x64x16 (896 tensor clocks; the next
mini-batch's loads are issued during Z1's matmul, the rows' loss inputs loaded during X2 W2's,
W1's step runs during db1's column sum, W2's and XQ W1' during gelu(Z1_bar), db2's column sum
during X2_bar W2': `gpu_cluster_lib.matmul_during`). At one instruction a clock with the
matmul waits that is 2,385 clocks; but one warpgroup is one warp per scheduler, so nothing
fills its gaps: with the stall clocks ptxas scheduled (dependent chains, the MUFU tanh pipe:
4,104) and the assumed latencies of the waits (three cluster barriers at 300 clocks, one
SM-to-SM round trip of ~200 after each, row-statistic shuffles) a mini-batch takes about 6,355
clocks: 19% of the matmul peak in the benchmarks' `ttt_flops` count (the dual form's 1,215
clocks a CTA; the kernel does that work with 896 in the primal form). A third of it is the
exchange and reduction latency, a third issue stalls, a third instructions: hiding latency
(a second warpgroup per CTA, or the next mini-batch's product XK W1 started before this one's
step lands, corrected in the dual form) is the way up, more than fewer instructions.
Checkpoints are saved outside the inner loop over a group's mini-batches.

Scope (`supports`): TTT-MLP, bf16 inputs, b = 64 (a wgmma tile is 64 rows), d = 64 with
cluster = 4 or 8 (the scratch must fit 227 KiB of shared memory: `smem_bytes`); checkpoints as
`gpu.forward` returns them (or W1, W2 in bf16: `weights_dtype`, the backward's stack of
states). Mini-batch n + 1's inputs are loaded (TMA) while n is computed. The backward on the
same split is `gpu_cluster_backward.py` (`gpu.backward` recomputes each group with this kernel,
then sweeps it in reverse there); both run `gpu_cluster_step.mini_batch`, the forward half of
a mini-batch. The recompute leaves out the output (`output=False`: XQ W1', gelu(Z1_bar),
X2_bar W2', the [b, d] sum and LayerNorm; W2's step runs during (eta G2) W2^T instead), which
the backward recomputes for its VJP anyway: 5,147 clocks a mini-batch on the latency timeline
(1,757 at an instruction a clock); its column sum of eta G2 then runs inside `share`'s cluster
barrier (`Cluster.share`'s `during`), 5,292 -> 4,742 clocks on a later toolchain.

Two warpgroups a CTA (`warpgroups=2`, cluster = 4 only; `BlockSizes.warpgroups`): each CTA's
slice is split between its warpgroups, so the head runs as 8 members of 32 hidden units, as at
cluster = 8 (W2^T held, 8 rows of the [b, d] work each), on 4 SMs. A member is then a
warpgroup (`Cluster`: a sibling's partials are read from this CTA's own shared memory, a peer
CTA's through distributed shared memory); `barrier.cluster` already counts every thread, so
the cluster barriers are unchanged. The inputs' tiles and the output's are the CTA's (warpgroup
0 issues the loads; the output's XQ rows are read before the first cluster barrier, past which
the sibling may prefetch over them), the rest is each warpgroup's own: 216 KiB of shared
memory, 255 registers a thread and 12 bytes of spills (228 on one warpgroup). The point is
latency: one warpgroup is one warp a scheduler, and with two, one's stalls are the other's
issue slots. On the latency timeline run for two warps on one scheduler
(`kernel_resources.py --warpgroups=2`; same toolchain as the row beside it, whose one-warpgroup
forward reads 6,208) a mini-batch takes 5,724 clocks: 8% fewer, not the 2x two chains would
give, because both warpgroups meet at the same three cluster barriers and wait on the same
exchanges (the first warp waits 1,495 clocks at barriers against 900 alone). The backward keeps
one warpgroup (its recompute's stack of states is laid out for its split). Not measured on a
GPU yet (`gpu_session.sh` times it beside one warpgroup).

In interpret mode (CPU) jax's Mosaic GPU interpreter has no distributed shared memory, so there
the partials go through a global-memory scratch instead; the compiled path is checked by
lowering and compiling for an H100 (compile-only devices) and has not yet run on a GPU.
"""
from __future__ import annotations

import functools
import math
import types

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.ttt.gpu_cluster_lib import (MOSAIC_RESERVE_BYTES, ROW_LAYOUTS,
                                                SMEM_LIMIT_BYTES, WGMMA, Cluster,
                                                cluster_kernel, cols, fetch, load_col,
                                                load_rows, row_block, stage, swizzled)
from pallas_kernels.ttt.gpu_cluster_step import mini_batch, normalize
from pallas_kernels.ttt.tile import num_groups


def smem_bytes(b: int, d: int, cluster: int, interpret: bool = False,
               warpgroups: int = 1) -> int:
  """Shared memory of one CTA: the sum over `forward`'s scratch list (barriers aside)."""
  return sum(math.prod(r.shape) * jnp.dtype(r.dtype).itemsize
             for r in _scratch(b, d, cluster, jnp.bfloat16, interpret, warpgroups)
             if isinstance(r, pl.MemoryRef))


def supports(kind: str, dtype, b: int, d: int, cluster: int, warpgroups: int = 1) -> bool:
  """Whether this kernel handles the shape; otherwise `gpu.forward` (Triton) does.

  TTT-MLP with bf16 inputs and b = 64 (a wgmma tile has 64 rows), d = 64 with cluster = 4
  (hidden slices of 64: 170 KiB of scratch) or 8 (slices of 32, W2 held transposed: see
  `w2_transposed`; 134 KiB), the row split's shapes (`gpu_cluster_lib.ROW_LAYOUTS`), and the
  scratch within one SM's shared memory (cluster = 2 needs 242 KiB). d = 128 does not fit yet
  (cluster = 8: 315 KiB), nor does d < 64 (its W1 update tile has d < 64 rows).
  `warpgroups` = 2 splits each CTA's slice between two warpgroups (`forward`): cluster = 4
  only (211 KiB of scratch; the slices are then 8 of 32 hidden units, as at cluster = 8).
  """
  f, split = 4 * d, cluster * warpgroups
  return (kind == "ttt_mlp" and jnp.dtype(dtype) == jnp.bfloat16 and b == 64 and d == 64
          and warpgroups in (1, 2)
          and b % split == 0 and b // split in ROW_LAYOUTS and f % split == 0
          and (f // split) % 32 == 0
          and smem_bytes(b, d, cluster, warpgroups=warpgroups) + MOSAIC_RESERVE_BYTES
          <= SMEM_LIMIT_BYTES)


def w2_transposed(d: int, cluster: int) -> bool:
  """Whether the CTAs hold W2^T's slice [d, f/P] instead of W2's [f/P, d] (P = `cluster`, the
  number of slices: CTAs x warpgroups in `forward`): when the slice is
  narrower than a wgmma tile's 64 rows (cluster = 8 at d = 64), W2's step is then taken as
  -(eta G2)^T X2, a [d, f/P] tile. The kernel's W2 input and checkpoints are W2^T in HBM too
  (`forward` transposes them)."""
  return 4 * d // cluster < 64


# W2-shaped arrays (W2, W2', their cotangent: in shared memory, the state stack, the kernels'
# HBM inputs and outputs) as the CTAs of a `cluster`-CTA split hold them: W2^T where
# `w2_transposed`. The layout is decided by these three alone.
def w2_shape(d: int, cluster: int, width: int) -> tuple[int, int]:
  """The [., .] shape of a W2-shaped array over `width` hidden units ([width, d] or W2^T's)."""
  return (d, width) if w2_transposed(d, cluster) else (width, d)


def w2_slice(ref, hid, d: int, cluster: int):
  """The hidden slice `hid` of a W2-shaped ref (its last two dims in `w2_shape`'s layout)."""
  return ref.at[:, hid] if w2_transposed(d, cluster) else ref.at[hid, :]


def swap_w2(w, d: int, cluster: int):
  """W2 [..., 4d, d] into the split's layout and back (a transpose where `w2_transposed`)."""
  return jnp.swapaxes(w, -1, -2) if w2_transposed(d, cluster) else w


def _scratch(b, d, cluster, dtype, interpret, warpgroups=1):
  """The CTA's scratch, in `_kernel`'s order: the inputs' and the output's shared-memory
  tiles, each member's own buffers (with a leading [W] where W = `warpgroups` > 1), then
  the barriers."""
  W = warpgroups
  fp, f32, bf16 = 4 * d // (cluster * W), jnp.float32, jnp.bfloat16
  w2 = w2_shape(d, cluster * W, fp)
  own = lambda shape: shape if W == 1 else (W, *shape)
  # 64-byte swizzles when the slice's tiles have 32 columns: a wgmma's operands share one.
  t = lambda shape, dt=bf16: swizzled(shape, dt, swizzle=64 if fp < 64 else None)
  each = {} if W == 1 else {"num_barriers": W}
  return (
      t((2, b, d), dtype), t((2, b, d), dtype),  # XQ, XK (2 buffers)
      t((2, b, d), dtype), plgpu.SMEM((2, b), f32),  # XV, eta
      t((b, d), dtype),  # out (each member writes its rows)
      t(own((d, fp))), t(own(w2)),  # W1, W2 (or W2^T) operands
      t(own((b, fp))), t(own((b, fp))),  # X2, X2_bar
      t(own((b, fp))),  # -eta * G1
      t(own((b, d))),  # -eta * G2
      plgpu.SMEM(own((2, b, d)), f32), plgpu.SMEM(own((d,)), f32),  # partial sums, db2's
      plgpu.SMEM(own((b, d) if interpret else (8,)), f32),  # a peer's (interpret only)
      plgpu.SMEM(own((d, fp)), f32), plgpu.SMEM(own((fp,)), f32), plgpu.SMEM(own(w2), f32),
      plgpu.SMEM(own((d,)), f32), plgpu.SMEM(own((2, d)), f32),  # state stage, gamma/beta
      plgpu.Barrier(num_arrivals=6, **each), plgpu.Barrier(num_arrivals=4, num_barriers=2),
      plgpu.Barrier(num_arrivals=1, **each),
      plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=W),
  )


def _kernel(xq_g, xk_g, xv_g, eta_g, gamma_g, beta_g, w1_g, b1_g, w2_g, b2_g,
            out_g, ck_w1, ck_b1, ck_w2, ck_b2, xch_g, xchr_g, scratch, *, eps, g,
            num_mini_batches, cluster, warpgroups, interpret, per_example_init, output):
  """One member, hidden slice m of head h, batch element i: CTA c, or with W = `warpgroups`
  > 1 its warpgroup wg, m = c W + wg (the inputs are the CTA's, loaded by its warpgroup 0; the
  rest is the member's own). Inputs are GMEM refs
  x [B, H, N, b, d] bf16, eta [B, H, N, b] f32, gamma/beta [H, d] f32, the initial state
  [H, ...] ([B, H, ...] per example) f32; outputs out [B, H, N, b, d], the checkpoints
  [B, H, G, ...] (W1 and W2 in f32 or bf16) and (interpret only) the exchange scratch
  [B, H, P, 3, b, d] f32 (partial sums; db2's in slot 2, row 0) and [B, H, P, 1, 16, d] bf16
  (-eta G2's row blocks), P the number of members."""
  W = warpgroups
  (xq_2, xk_2, xv_2, eta_2, out_s, *mine, load_bar, recv_bar, cbar) = scratch
  i, h, c = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("cluster")
  wg = lax.axis_index("wg") if W > 1 else 0
  of = (lambda ref, w: ref) if W == 1 else (lambda ref, w: ref.at[w])  # warpgroup w's
  # -eta G2's tile and the partial sums, all warpgroups' (the exchanges read the sibling's),
  # and this warpgroup's own buffers.
  neg_eg2_all, part_all, db2_all = mine[5:8]
  (w1b_s, w2b_s, x2_s, x2bar_s, neg_eg1_s, neg_eg2_s, _, _, recv_s,
   st_w1, st_b1, st_w2, st_b2, vec_s, init_bar, recv_bar) = (of(r, wg) for r in (*mine, recv_bar))
  b, d = out_s.shape
  fp = w1b_s.shape[1]
  split, m = cluster * W, c * W + wg
  hid = pl.ds(m * fp, fp)  # this member's slice of the hidden width
  bf16_weights = ck_w1.dtype == jnp.bfloat16  # the backward's state stack: W1, W2 as operands
  w2_hid = lambda ref: w2_slice(ref, hid, d, split)  # (W2^T's where `w2_transposed`)
  block = row_block(m, b, d, split)  # the member's rows of the [b, d] work
  vec = lambda k: k == "db2"
  cl = Cluster(m, split, interpret, cbar, recv_bar,
               buf=lambda k, w: of(db2_all, w) if vec(k) else of(part_all, w).at[k],
               xch=lambda k, p: xch_g.at[i, h, p, 2, 0] if vec(k) else xch_g.at[i, h, p, k],
               recv=lambda k: recv_s.at[0] if vec(k) else recv_s,
               xch_rows=lambda j, p: xchr_g.at[i, h, p, j],
               shared=lambda name, w: of(neg_eg2_all, w), warpgroups=W)

  def prefetch(n):  # mini-batch n's inputs into buffer n % 2, in flight during mini-batch n - 1
    slot = lax.rem(n, 2)
    pairs = [(xq_g.at[i, h, n], xq_2.at[slot]), (xk_g.at[i, h, n], xk_2.at[slot]),
             (xv_g.at[i, h, n], xv_2.at[slot]), (eta_g.at[i, h, n], eta_2.at[slot])]
    if W == 1:
      fetch(pairs, load_bar.at[slot], wait=False)
    else:  # the CTA's, by its warpgroup 0; both wait on load_bar
      pl.when(wg == 0)(lambda: fetch(pairs, load_bar.at[slot], wait=False))

  # LayerNorm parameters and the initial state slice, f32.
  head = (lambda r: r.at[i, h]) if per_example_init else (lambda r: r.at[h])
  fetch([(gamma_g.at[h], vec_s.at[0]), (beta_g.at[h], vec_s.at[1]),
         (head(w1_g).at[:, hid], st_w1), (head(b1_g).at[0, hid], st_b1),
         (w2_hid(head(w2_g)), st_w2), (head(b2_g).at[0], st_b2)], init_bar)
  state = (plgpu.load(st_w1, layout=WGMMA), load_col(st_b1),
           plgpu.load(st_w2, layout=WGMMA), load_col(st_b2, block.col))

  def save_checkpoint(n, state):
    """The state at the start of group n // g; W1, W2 from their bf16 operand copies when the
    checkpoints are bf16."""
    W1, b1, W2, b2 = state
    k = lax.div(n, g)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the stage buffers are free again
    st_b1[...], st_b2[...] = b1, b2
    if not bf16_weights:
      st_w1[...], st_w2[...] = W1, W2
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(w1b_s if bf16_weights else st_w1, ck_w1.at[i, h, k, :, hid])
    plgpu.copy_smem_to_gmem(st_b1, ck_b1.at[i, h, k, 0, hid])
    plgpu.copy_smem_to_gmem(w2b_s if bf16_weights else st_w2, w2_hid(ck_w2.at[i, h, k]))

    @pl.when(m == 0)
    def _():
      plgpu.copy_smem_to_gmem(st_b2, ck_b2.at[i, h, k, 0])

  def step(n, state, save=False):
    W1, b1, W2, b2 = state  # (W1, W2 staged in w1b_s, w2b_s as bf16 operands)

    slot = lax.rem(n, 2)
    plgpu.barrier_wait(load_bar.at[slot])
    bufs = types.SimpleNamespace(
        xq=xq_2.at[slot], xk=xk_2.at[slot], xv=xv_2.at[slot], w1=w1b_s, w2=w2b_s, x2=x2_s,
        x2_bar=x2bar_s, neg_eg1=neg_eg1_s, neg_eg2=neg_eg2_s, ln=vec_s, eta=eta_2.at[slot])

    # The gradient step (at the mini-batch's last token) is taken in mini_batch, which stages
    # the new W1, W2 once the bf16 checkpoint has left w1b_s, w2b_s.
    wait = functools.partial(plgpu.wait_smem_to_gmem, 0, wait_read_only=True)
    def prefetch_next():  # while Z1's matmul runs (the other buffer's readers, n - 1, are done)
      if save:  # g = 1: every mini-batch (Z1's matmul reads W1's operand too)
        save_checkpoint(n, state)
      pl.when(n + 1 < num_mini_batches)(lambda: prefetch(n + 1))
    # With two warpgroups, the output's XQ rows are read before the mini-batch's first cluster
    # barrier: past it, the sibling's next prefetch may overwrite this buffer (a CTA alone
    # prefetches only after its own output).
    xq_rows = load_rows(bufs.xq, block) if output and W > 1 else None
    r = mini_batch(bufs, b1, b2, eps, cl, block, state=(W1, W2), interpret=interpret,
                   before_stage=wait if bf16_weights else None, during_z1=prefetch_next,
                   output=output, w2_transposed=w2_transposed(d, split))
    if output:  # the member's rows of the output: XQ + gamma * LN(Z2_bar) + beta
      x_hat, _ = normalize(r.Z2_bar, eps)
      ln = lambda k: cols(load_col(vec_s.at[k], block.col), x_hat.shape)
      out = (load_rows(bufs.xq, block) if xq_rows is None else xq_rows) + ln(0) * x_hat + ln(1)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      out_s.at[block.ds][...] = out.astype(out_s.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_s.at[block.ds], out_g.at[i, h, n, block.ds])
    # No barrier ends the step: each exchange buffer is written again only after a later
    # barrier than the one its peers read it behind (slot 0: Z2's, read before `share`'s; the
    # shared rows: read before Z2_bar's; slot 1 and db2's: read before the next Z2's).
    return r.W1, b1 - r.db1, r.W2, b2 - r.db2

  def group(k, state):  # mini-batches k*g .. min((k+1)*g, N) - 1, after their checkpoint
    save_checkpoint(k * g, state)
    return lax.fori_loop(k * g, jnp.minimum(k * g + g, num_mini_batches), step, state)

  # The checkpoint is saved outside the mini-batch loop (its f32 stores took a fifteenth of the
  # loop's instructions as a branch taken once in g), unless every state is one (g = 1).
  prefetch(0)
  stage((w1b_s, state[0]), (w2b_s, state[2]))  # then staged by each step's update
  if g == 1:
    final = lax.fori_loop(0, num_mini_batches, functools.partial(step, save=True), state)
    if bf16_weights:  # the backward's stack of states ends with the state after the last
      save_checkpoint(num_mini_batches, final)
  else:
    lax.fori_loop(0, num_groups(num_mini_batches, g), group, state)
  cl.sync()  # no CTA exits while a peer may still read its shared memory
  plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("eps", "checkpoint_group", "cluster", "warpgroups",
                                             "interpret", "debug", "per_example_init",
                                             "weights_dtype", "output"))
def forward(xq, xk, xv, eta, ln_weight, ln_bias, init, *, eps: float, checkpoint_group: int,
            cluster: int = 4, warpgroups: int = 1, interpret=False, debug: bool = False,
            per_example_init: bool = False, weights_dtype=jnp.float32, output: bool = True):
  """TTT-MLP forward; arguments and results as `gpu.forward` (kind="ttt_mlp").

  xq, xk, xv: [B, H, N, 64, d] bf16; eta: [B, H, N, 64]; ln_weight, ln_bias: [H, d]; init:
  (W1 [H, d, 4d], b1 [H, 1, 4d], W2 [H, 4d, d], b2 [H, 1, d]), each [B, H, ...] with
  per_example_init (the backward's recompute from checkpoints). `cluster`: CTAs per head;
  `warpgroups`: 2 splits each CTA's slice between two warpgroups (8 slices at cluster = 4, as
  cluster = 8's, on half the CTAs: each warpgroup's waits are the other's issue slots).
  `weights_dtype`: of the W1 and W2 checkpoints (b1, b2 stay f32); bf16 for the backward's
  stack of states (`gpu_cluster_backward`), which are exactly the operands the kernel's
  matmuls used, at checkpoint_group = 1: N + 1 of them, the state after the last mini-batch
  too; W2's as W2^T [B, H, N + 1, d, 4d] where `w2_transposed`. `output`: False for the
  states alone (the backward's recompute, which recomputes each mini-batch's output itself):
  the returned output is then None.
  `interpret`: False, or a `plgpu.InterpretGPUParams` to run on the CPU; `debug`: print the
  kernel's jaxpr and lowered code.
  """
  B, H, N, b, d = xq.shape
  f = 4 * d
  W, split = warpgroups, cluster * warpgroups
  if not supports("ttt_mlp", xq.dtype, b, d, cluster, W):
    raise ValueError(f"gpu_cluster.forward: b={b}, d={d}, dtype {xq.dtype}, cluster={cluster}, "
                     f"warpgroups={W} is not supported (see gpu_cluster.supports: bf16, b = 64, "
                     "d = 64 with cluster = 4 or 8, or 4 with warpgroups = 2); use gpu.forward.")
  stack = jnp.dtype(weights_dtype) == jnp.bfloat16  # the backward's stack of states
  if stack and checkpoint_group != 1:
    raise ValueError(f"gpu_cluster.forward: weights_dtype=bfloat16 (the backward's stack of "
                     f"states) needs checkpoint_group=1, not {checkpoint_group}.")
  if stack and W > 1:  # the stack's W2 layout is the backward's split (`w2_transposed`)
    raise ValueError("gpu_cluster.forward: weights_dtype=bfloat16 (the backward's stack of "
                     "states) is laid out for the backward's split: use warpgroups=1.")
  G = num_groups(N, checkpoint_group) + stack
  f32 = jnp.float32
  state_types = (((d, f), weights_dtype), ((1, f), f32), (w2_shape(d, split, f), weights_dtype),
                 ((1, d), f32))
  out_type = (jax.ShapeDtypeStruct(xq.shape if output else (1,), xq.dtype),
              *(jax.ShapeDtypeStruct((B, H, G, *s), t) for s, t in state_types),
              jax.ShapeDtypeStruct((B, H, split, 3, b, d) if interpret else (1,), f32),
              jax.ShapeDtypeStruct((B, H, split, 1, b // split, d) if interpret else (1,),
                                   xq.dtype))
  body = functools.partial(_kernel, eps=eps, g=checkpoint_group, num_mini_batches=N,
                           cluster=cluster, warpgroups=W, interpret=bool(interpret),
                           per_example_init=per_example_init, output=output)
  kernel = cluster_kernel(body, "ttt_mlp_forward_cluster", out_type=out_type,
                          scratch=_scratch(b, d, cluster, xq.dtype, bool(interpret), W),
                          grid=(B, H), cluster=cluster, warpgroups=W, interpret=interpret,
                          debug=debug)
  W1, b1, W2, b2 = (w.astype(f32) for w in init)
  swap = lambda w: swap_w2(w, d, split)
  out, ck_w1, ck_b1, ck_w2, ck_b2, _, _ = kernel(
      xq, xk, xv, eta.astype(f32), ln_weight.astype(f32), ln_bias.astype(f32), W1, b1,
      swap(W2), b2)
  # The backward's stack keeps W2^T as the kernels on this split read it (no transpose of
  # g + 1 states); f32 checkpoints, one a group, are returned as W2.
  return out if output else None, (ck_w1, ck_b1, ck_w2 if stack else swap(ck_w2), ck_b2)
