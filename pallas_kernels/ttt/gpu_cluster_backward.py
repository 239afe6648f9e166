"""TTT-MLP backward of one checkpoint group as a Mosaic GPU kernel, the state split across a
cluster of CTAs as in `gpu_cluster.py` (Hopper).

`gpu.backward` walks the groups last first. For each, `gpu_cluster.forward` recomputes the g
states the group passes through from its checkpoint and the one after it (W1, W2 as the bf16
operands its matmuls used, b1, b2 in f32: [B, H, g + 1, ...] in HBM; without the output), and
this kernel runs the group in reverse (at checkpoint_group = 1 the forward saved them all, and
one call runs the whole sequence: `gpu.stores_states`): CTA c of a (batch, head) holds the
cotangent of its hidden slice of the state (dW1[:, slice], db1[slice], dW2[slice, :] in f32
registers; db2 replicated), and for mini-batch t = g-1, ..., 0 it loads state t's slice,
recomputes the mini-batch (`gpu_cluster_step.mini_batch`, its two cluster sums, and the stepped
state W1', W2' staged in bf16) and pulls the cotangents back through it.

The VJP of the mini-batch (its derivation, its cluster exchanges, what keeps it short) is
`gpu_cluster_vjp.mini_batch_vjp`; this module is the kernel around it.

W' = (W1', b1', W2', b2') of mini-batch t is the state after t, which mini-batch t + 1, swept
just before, read as its W: each step copies it into W''s tiles at its start (the first, t =
g - 1, has it from the stack's last state, fetched with the prologue) instead of taking the
step again (`mini_batch`'s `stepped`), so Z1_bar = XQ W1' starts with Z1, gelu(Z1_bar) runs
during X2 W2 (gelu'(Z1_bar) waits in D1's tile) and X2_bar W2' with G2 W2^T. The first step
is traced apart from the loop over the others, so that the loop has no branch on the step.

The loop holds 255 registers a thread and spills (a 2.4 KiB stack frame). The measured steps
(`benchmarks/kernel_resources.py`: 18,790 clocks a mini-batch on the latency timeline at
cluster = 4) and what was tried and lost are in the README's Benchmark section. Three of the
VJP's four exchanges and its forward half's `share` run work inside their cluster barrier
(`Cluster.sum`/`share`'s `during`: between the arrive and the wait), and Z2_bar's product runs
across that `share`, which took a mini-batch from 19,062 to 17,522 clocks on the timeline (the
same toolchain for both; 13,520 to 13,010 at 8). Next: warp
specialisation (a second warpgroup holding the state cotangents and their matmuls would take 64
registers a thread off this one; every warp must then join the cluster barriers, or they become
mbarrier based).

Scope (`supports`): as the forward's, b = d = 64 and cluster = 4 or 8. Shared memory at 4: 20
bf16 tiles and 3 f32 ones, 212 KiB (`smem_bytes`; Mosaic GPU asks for 225 KiB of the 227).
There is no room for a second set of input tiles, so mini-batch t - 1's inputs are loaded
once t has read what they replace (after the rows' work, about the last third of the step): XQ,
XV, ct_out, eta, b1 and b2 into their own buffers, and XK, W1 and W2, whose own tiles t reads
until its end, into three operand tiles dead by then, copied over at t - 1's start (d XQ, d XK
and d XV leave through the tiles of X2_bar, XK and W2'; the partial-sum slots double as G1's
parking and the f32 staging of the state cotangent at the start and end). On the loop's
timeline, which has no memory latency, that cost 113 instructions a step when measured (8,276
clocks instead of 8,115); it takes a 49 KiB round trip to HBM off the start of every step.
At 8 (hidden slices of 32) the W2-shaped tiles and the state stack hold W2^T, as the forward
does (`gpu_cluster.w2_transposed`: every product with W2, W2' or their cotangent is taken on
the transpose, CW2 += A^T B as CW2^T += B^T A), every tile has a 64-byte swizzle, and the
slice's [., 32] tiles cannot stand in for [b, d] or f32 [d, 64] buffers, so those five have
their own (211 KiB in all; Mosaic GPU asks for 225 KiB). A mini-batch then takes 13,708 clocks
on the latency timeline (3,853 instructions, 70 HGMMA; 3,930 at an instruction a clock), the
recompute's 4,132: 0.73 and 0.80 of the times on 4 for half the work."""
from __future__ import annotations

import functools
import math
import types

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.ttt import gpu_cluster
from pallas_kernels.ttt.gpu_cluster_lib import (MOSAIC_RESERVE_BYTES, SMEM_LIMIT_BYTES, WGMMA,
                                                Cluster, cluster_kernel, fetch, load_col,
                                                row_block, stage, swizzled)
from pallas_kernels.ttt.gpu_cluster_step import mini_batch
from pallas_kernels.ttt.gpu_cluster_vjp import mini_batch_vjp


def smem_bytes(b: int, d: int, cluster: int, interpret: bool = False) -> int:
  """Shared memory of one CTA: the sum over the kernel's scratch list (barriers aside)."""
  return sum(math.prod(r.shape) * jnp.dtype(r.dtype).itemsize
             for r in _scratch(b, d, cluster, interpret) if isinstance(r, pl.MemoryRef))


def supports(kind: str, dtype, b: int, d: int, cluster: int) -> bool:
  """Whether this kernel runs the backward; otherwise `gpu.backward`'s reverse sweep does."""
  return (gpu_cluster.supports(kind, dtype, b, d, cluster) and b == d
          and (4 * d // cluster == d or gpu_cluster.w2_transposed(d, cluster))
          and smem_bytes(b, d, cluster) + MOSAIC_RESERVE_BYTES <= SMEM_LIMIT_BYTES)


def _scratch(b, d, cluster, interpret):
  """The CTA's scratch, in `_kernel`'s order: shared-memory buffers, then barriers."""
  fp, f32, bf16 = 4 * d // cluster, jnp.float32, jnp.bfloat16
  tr = gpu_cluster.w2_transposed(d, cluster)
  w2 = gpu_cluster.w2_shape(d, cluster, fp)  # W2-shaped tiles (W2, W2', its cotangent)
  t = lambda *shape: swizzled(shape, bf16, swizzle=64 if fp < 64 else None)
  # Where the hidden slice is narrower than d (tr), the tiles that double as [b, d] or f32
  # [d, fp] buffers at fp = d (see `_kernel`) cannot: these take their place.
  own = (t(b, d), t(b, d), t(b, d), plgpu.SMEM((b, fp), f32),
         plgpu.SMEM((2, d, fp), f32)) if tr else ()
  # Swizzled tiles first, vectors last: each tile is aligned to 1 KiB.
  return (
      t(b, d), t(b, d), t(b, d), t(b, d), t(d, fp), t(*w2),  # XQ XK XV ct_out, W1 W2 at t
      t(b, fp), t(b, fp), t(b, fp), t(b, d), t(b, d), t(d, fp), t(*w2), t(b, b),  # recompute's
      t(b, fp),  # gelu'(Z1), parked
      t(b, d), t(d, fp), t(*w2), t(b, fp), t(b, fp),  # backward operands
      *own[:3],  # (tr) XK ahead, ct_out's rows then d XQ's, d XV's
      plgpu.SMEM((3, b, d), f32),  # partial sums: 3 slots
      *own[3:],  # (tr) G1, f32; the state cotangent's staging, f32
      plgpu.SMEM((b, d) if interpret else (8,), f32),  # a peer's, received (interpret only)
      plgpu.SMEM((b,), f32), plgpu.SMEM((fp,), f32), plgpu.SMEM((d,), f32),  # eta, b1, b2 at t
      plgpu.SMEM((b,), f32),  # d eta's rows, out
      plgpu.SMEM((b,), f32), plgpu.SMEM((b,) if interpret else (8,), f32),  # ct_eta partial
      plgpu.SMEM((fp,), f32), plgpu.SMEM((d,), f32),  # ct b1, ct b2 (accumulated here)
      plgpu.SMEM((d,), f32), plgpu.SMEM((d,) if interpret else (8,), f32),  # a [d] partial
      plgpu.SMEM((2, d), f32), plgpu.SMEM((2, d), f32),  # gamma, beta; their cotangents
      plgpu.SMEM((fp,), f32), plgpu.SMEM((d,), f32),  # b1', b2' (the next state's)
      plgpu.Barrier(num_arrivals=10), plgpu.Barrier(num_arrivals=9),
      plgpu.Barrier(num_arrivals=1),
      plgpu.ClusterBarrier(collective_axes=("cluster",)),
  )


def _kernel(xq_g, xk_g, xv_g, eta_g, cto_g, gamma_g, beta_g, w1_g, b1_g, w2_g, b2_g,
            cw1_g, cb1_g, cw2_g, cb2_g,
            dxq_g, dxk_g, dxv_g, deta_g, dln_g, dw1_g, db1_g, dw2_g, db2_g, xch_g, xche_g,
            xchv_g, xchr_g, scratch, *, eps, g, cluster, interpret):
  """One CTA: hidden slice c of head h, batch element i, one group of g mini-batches. GMEM refs:
  x, ct_out [B, H, g, b, d] bf16, eta [B, H, g, b] f32, gamma/beta [H, d] f32, the states
  before each mini-batch [B, H, g, ...] (W1, W2 bf16, b1, b2 f32), the group's final state
  cotangent [B, H, ...] f32; outputs the cotangents of x and eta (like them), each CTA's part
  of (gamma, beta)'s [B, H, P, 2, d] (its rows'), of the group's initial state [B, H, ...] and
  (interpret only) the exchange scratch [B, H, P, 3, b, d], [B, H, P, b], [B, H, P, d] f32
  and [B, H, P, 2, b / P, d] bf16."""
  (xq_s, xk_s, xv_s, cto_s, w1_s, w2_s,
   x2_s, x2bar_s, neg_eg1_s, g2_s, neg_eg2_s, w1p_s, w2p_s, attn_s, dx2_s,
   d2_s, cw1_s, cw2_s, d1_s, ctp_s, *rest) = scratch
  i, h, c = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("cluster")
  b, d = xq_s.shape
  fp = w1_s.shape[1]
  hid = pl.ds(c * fp, fp)  # this CTA's slice of the hidden width
  # W2-shaped refs (W2, W2', their cotangent, in shared memory and HBM) hold W2^T at tr.
  tr = gpu_cluster.w2_transposed(d, cluster)
  w2_hid = lambda ref: gpu_cluster.w2_slice(ref, hid, d, cluster)
  if tr:
    xkn_s, ctq_s, dxv_s, part_s, g1_s, cws_s, *rest = rest
  else:  # fp = d: tiles dead by then hold these (see `load` and `gpu_cluster_vjp`)
    part_s, *rest = rest
    xkn_s, ctq_s, dxv_s, g1_s = w1p_s, x2bar_s, w2p_s, part_s.at[2]
    cws_s = part_s  # slots 0, 1: the state cotangent's staging at the start and the end
  (recv_s, eta_s, b1_s, b2_s, deta_s, parte_s, recve_s, vb1_s, vb2_s, partv_s, recvv_s,
   vec_s, ctln_s, b1n_s, b2n_s, init_bar, load_bar, recv_bar, cbar) = rest
  f32 = jnp.float32
  block = row_block(c, b, d, cluster)  # the CTA's rows of the [b, d] work
  # Exchange buffers: slots 0-2 [b, d], "eta" [b] and "v" [d] (vectors' partial sums;
  # `mini_batch`'s backward sums no "db2": b2' comes with the next state).
  vecs = {"eta": (parte_s, xche_g, recve_s), "v": (partv_s, xchv_g, recvv_s)}
  cl = Cluster(c, cluster, interpret, cbar, recv_bar,
               buf=lambda k, w: vecs[k][0] if k in vecs else part_s.at[k],
               xch=lambda k, p: vecs[k][1].at[i, h, p] if k in vecs else xch_g.at[i, h, p, k],
               recv=lambda k: vecs[k][2] if k in vecs else recv_s,
               xch_rows=lambda j, p: xchr_g.at[i, h, p, j],
               shared=lambda name, w: {"neg_eg2": neg_eg2_s, "g2": g2_s, "d2": d2_s}[name])

  # LayerNorm parameters and the cotangent of the group's final state (f32; W1's and W2's
  # through cws_s: the partial-sum slots, free until the first mini-batch, where fp = d).
  # And W' of the last mini-batch (the group's final state) into W''s tiles: see `step`.
  fetch([(gamma_g.at[h], vec_s.at[0]), (beta_g.at[h], vec_s.at[1]),
         (cw1_g.at[i, h, :, hid], cws_s.at[0]), (cb1_g.at[i, h, 0, hid], vb1_s),
         (w2_hid(cw2_g.at[i, h]), cws_s.at[1]), (cb2_g.at[i, h, 0], vb2_s),
         (w1_g.at[i, h, g, :, hid], w1p_s), (b1_g.at[i, h, g, 0, hid], b1n_s),
         (w2_hid(w2_g.at[i, h, g]), w2p_s), (b2_g.at[i, h, g, 0], b2n_s)], init_bar)
  ctln_s[...] = jnp.zeros((2, d), f32)  # (a warpgroup barrier comes before its first use)
  carry = (plgpu.load(cws_s.at[0], layout=WGMMA), plgpu.load(cws_s.at[1], layout=WGMMA))
  # Only dW1 and dW2 are carried in registers. The vector cotangents (b1, b2, gamma, beta)
  # accumulate in shared memory and gamma, beta are loaded where used: a [n] vector in a
  # WGMMA column layout takes n / 4 registers per thread, and carried through the step the six
  # of them cost 96 registers at n = 64, which spilled. A warpgroup barrier (`stage`, `matmul`
  # operands' commit) separates each store from the other threads' next load of the vector.

  # The buffers `mini_batch` and `mini_batch_vjp` take (Q is parked in ct_P's tile).
  bufs = types.SimpleNamespace(
      xq=xq_s, xk=xk_s, xv=xv_s, w1=w1_s, w2=w2_s, x2=x2_s, x2_bar=x2bar_s,
      neg_eg1=neg_eg1_s, neg_eg2=neg_eg2_s, g2=g2_s, w1_new=w1p_s, w2_new=w2p_s, attn=attn_s,
      dx2=dx2_s, q=ctp_s, g1=g1_s, ln=vec_s, eta=eta_s, d1=d1_s, cto=cto_s, d2=d2_s,
      cw1=cw1_s, cw2=cw2_s, ctp=ctp_s, ctq=ctq_s, dxv=dxv_s, part=part_s, vb1=vb1_s,
      vb2=vb2_s, ctln=ctln_s, deta=deta_s)

  def load(t, ahead):
    """Mini-batch t's inputs, TMA, arriving on load_bar. Ahead (issued during mini-batch
    t + 1, once it has read them): XK, W1 and W2 go to tiles dead by then (those of W1' and
    its cotangent, ct_P's; XK to its own where fp < d) and are copied into their own at t's
    start, since their own are read until t + 1's end (the three pairs as alternating slots
    cost 315 more instructions a step in dynamic wgmma descriptors; the copies about 60)."""
    tiles = (xkn_s, cw1_s, ctp_s) if ahead else (xk_s, w1_s, w2_s)
    fetch([(xq_g.at[i, h, t], xq_s), (xv_g.at[i, h, t], xv_s), (cto_g.at[i, h, t], cto_s),
           (eta_g.at[i, h, t], eta_s), (b1_g.at[i, h, t, 0, hid], b1_s),
           (b2_g.at[i, h, t, 0], b2_s), *zip((xk_g.at[i, h, t], w1_g.at[i, h, t, :, hid],
                                              w2_hid(w2_g.at[i, h, t])), tiles)],
          load_bar, wait=False)

  def step(k, carry, first=False):
    # carry: (CW1, CW2), the cotangents of W1, W2 after mini-batch t (b1's, b2's: vb1_s, vb2_s)
    t = g - 1 - k
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last step's outputs have left
    if first:
      load(t, ahead=False)  # (later ones: during the step before)
    plgpu.barrier_wait(load_bar)
    b1, b2 = load_col(b1_s), load_col(b2_s, block.col)
    if not first:  # W' is the state after t, which t + 1 read as W (in w1_s, w2_s)
      stage(*((dst, plgpu.load(src, layout=WGMMA)) for src, dst in
              ((xkn_s, xk_s), (w1_s, w1p_s), (cw1_s, w1_s), (w2_s, w2p_s), (ctp_s, w2_s))))
    stepped = (load_col(b1n_s), load_col(b2n_s, block.col))  # b1', b2'
    r = mini_batch(bufs, b1, b2, eps, cl, block, interpret=interpret, stepped=stepped,
                   w2_transposed=tr)
    # b1, b2 at t for t - 1 (its b1', b2'), past mini_batch's warpgroup barriers: every
    # thread has read b1n_s, b2n_s, and the next step reads them past more.
    b1n_s[...], b2n_s[...] = b1, b2
    load_next = lambda: pl.when(k + 1 < g)(lambda: load(t - 1, ahead=True))
    CW1, CW2 = mini_batch_vjp(bufs, r, carry, eps, cl, block, load_next, interpret=interpret,
                              w2_transposed=tr)
    plgpu.commit_smem()
    for src, dst in ((ctq_s, dxq_g), (xk_s, dxk_g), (dxv_s, dxv_g), (deta_s, deta_g)):
      plgpu.copy_smem_to_gmem(src.at[block.ds], dst.at[i, h, t, block.ds])

    return CW1, CW2  # (no barrier needed here: see `gpu_cluster_vjp`'s docstring)

  # The first step apart (traced twice, the loop has no branch on k): it loads its inputs
  # itself, and its W' came with the prologue.
  carry = step(jnp.int32(0), carry, first=True)
  CW1, CW2 = lax.fori_loop(1, g, step, carry)
  cl.sync()  # no CTA exits or reuses slots 0, 1 while a peer may still read them
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  cws_s.at[0][...], cws_s.at[1][...] = CW1, CW2  # (fp = d: the last barrier freed the slots)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(cws_s.at[0], dw1_g.at[i, h, :, hid])
  plgpu.copy_smem_to_gmem(vb1_s, db1_g.at[i, h, 0, hid])
  plgpu.copy_smem_to_gmem(cws_s.at[1], w2_hid(dw2_g.at[i, h]))

  plgpu.copy_smem_to_gmem(ctln_s, dln_g.at[i, h, c])

  @pl.when(c == 0)
  def _():
    plgpu.copy_smem_to_gmem(vb2_s, db2_g.at[i, h, 0])

  plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("eps", "cluster", "interpret", "debug"))
def backward_group(xs, ln_weight, ln_bias, states, ct_out, ct_final, *, eps: float,
                   cluster: int = 4, interpret=False, debug: bool = False):
  """One group's reverse sweep (`gpu._backward_group`'s job) on the cluster split.

  xs: (xq, xk, xv [B, H, g, 64, d] bf16, eta [B, H, g, 64]); ln_weight, ln_bias: [H, d];
  states: the states before each of the g mini-batches and after the last, W1
  [B, H, g + 1, d, 4d] and W2 in bf16 (W2^T [B, H, g + 1, d, 4d] where
  `gpu_cluster.w2_transposed`), b1, b2 in f32 (`gpu_cluster.forward` on the same cluster with
  checkpoint_group=1, weights_dtype=bf16); ct_out
  [B, H, g, 64, d]; ct_final: the cotangent of the group's final state, f32 [B, H, ...].
  `interpret`: False or a `plgpu.InterpretGPUParams`.

  Returns (ct_xq, ct_xk, ct_xv in their dtype, ct_eta [B, H, g, 64] f32, ct_gamma [B, H, d],
  ct_beta [B, H, d], the cotangent of the group's initial state (f32, [B, H, ...])).
  """
  xq, xk, xv, eta = xs
  B, H, g, b, d = xq.shape
  if not supports("ttt_mlp", xq.dtype, b, d, cluster):
    raise ValueError(f"gpu_cluster_backward: b={b}, d={d}, dtype {xq.dtype}, cluster={cluster}"
                     " is not supported (bf16, b = d = 64, cluster = 4 or 8); use "
                     "gpu.backward.")
  if any(w.shape[2] != g + 1 for w in states):
    raise ValueError(f"gpu_cluster_backward: states hold {[w.shape[2] for w in states]} "
                     f"states for g = {g} mini-batches; pass g + 1 = {g + 1}, the states "
                     "before each and after the last (gpu_cluster.forward with "
                     "checkpoint_group=1, weights_dtype=bfloat16).")
  if states[2].shape[3:] != (want := gpu_cluster.w2_shape(d, cluster, 4 * d)):
    raise ValueError(f"gpu_cluster_backward: W2's states have shape {states[2].shape[3:]}; "
                     f"on {cluster} CTAs a head they are {want} "
                     f"({'W2^T' if gpu_cluster.w2_transposed(d, cluster) else 'W2'}), as "
                     "gpu_cluster.forward saves them on that split.")
  swap = lambda w: gpu_cluster.swap_w2(w, d, cluster)  # W2's cotangent as the kernel holds it
  ct_final = (*ct_final[:2], swap(ct_final[2]), ct_final[3])
  f32 = jnp.float32
  out_type = (*(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (xq, xk, xv)),
              jax.ShapeDtypeStruct(eta.shape, f32),
              jax.ShapeDtypeStruct((B, H, cluster, 2, d), f32),
              *(jax.ShapeDtypeStruct(c.shape, f32) for c in ct_final),
              *(jax.ShapeDtypeStruct((B, H, cluster, *shape) if interpret else (1,), dtype)
                for shape, dtype in (((3, b, d), f32), ((b,), f32), ((d,), f32),
                                     ((2, b // cluster, d), xq.dtype))))
  body = functools.partial(_kernel, eps=eps, g=g, cluster=cluster, interpret=bool(interpret))
  kernel = cluster_kernel(body, "ttt_mlp_backward_cluster", out_type=out_type,
                          scratch=_scratch(b, d, cluster, bool(interpret)), grid=(B, H),
                          cluster=cluster, interpret=interpret, debug=debug)
  W1, b1, W2, b2 = states
  outs = kernel(xq, xk, xv, eta.astype(f32), ct_out.astype(xq.dtype), ln_weight.astype(f32),
                ln_bias.astype(f32), W1.astype(jnp.bfloat16), b1.astype(f32),
                W2.astype(jnp.bfloat16), b2.astype(f32), *(c.astype(f32) for c in ct_final))
  ct_xq, ct_xk, ct_xv, ct_eta, ct_ln, *ct_init = outs[:9]
  ct_ln = ct_ln.sum(axis=2)  # over the CTAs' rows
  ct_init = (*ct_init[:2], swap(ct_init[2]), ct_init[3])
  return ct_xq, ct_xk, ct_xv, ct_eta, ct_ln[:, :, 0], ct_ln[:, :, 1], ct_init
