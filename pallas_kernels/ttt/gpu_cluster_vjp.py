"""The VJP of one TTT-MLP mini-batch on one CTA's slice of the hidden width, as the cluster
backward (`gpu_cluster_backward.py`) runs it after `gpu_cluster_step.mini_batch` has recomputed
the mini-batch: `mini_batch_vjp`. The kernel around it (scratch, loads, the reverse loop, the
outputs) is `gpu_cluster_backward.py`; the split and why it is exact, `gpu_cluster.py`.

The VJP follows the primal form, f(XQ; W'): the cotangent of W' is the incoming one plus the
output's (ct_W2' = CW2 + X2_bar^T D2, ct_W1' = CW1 + XQ^T D1, with D2, D1 the cotangents of
Z2_bar, Z1_bar), staged once, and every product with it pulls it back through the step
W' = W - X^T eG: ct_X2 gets -eG2 ct_W2'^T, ct_eG2 gets -X2 ct_W2', and likewise for XK and eG1.
So ct_X2_bar = D2 W2'^T and ct_XQ = D1 W1'^T, and no [b, b] Gram matrix, M = D2 eG2^T or its
cotangent is formed: 23 matmuls instead of the dual form's 31 (21 where W' is at hand, as in
the backward kernel, which copies it from the mini-batch swept before).
One Gram matrix is kept:
ct_eG1 = -(XK CW1 + (XQ XK^T)^T D1 + ct_b1'), which does not wait for ct_W1' to be staged
(the chain D1 -> ct_eG1 -> ct_P -> ct_G2 gates the rows' work).

The VJP is written out by hand (jax.vjp's graph does not survive Mosaic GPU's layout
inference); its derivation follows the forward line by line, and the tests compare it with the
pure op's autodiff. Everything a hidden slice contributes to a [b, d] quantity is a partial sum
over the cluster, so the backward adds two more exchanges through distributed shared memory:

  ct_G2 = eta * (sum_c ct_eG2_c - db2') + sum_c (ct_G1_c * gelu'(Z1_c)) W2_c
          (G2 feeds every slice's G1 and the W2 update; needed before LayerNorm-L2's VJP; db2'
          is b2's cotangent so far, which meets eG2 through colsum(eG2))
  ct_XQ, ct_XK, ct_eta: sums of the slices' parts (XQ and XK meet every W1 slice), in the
          step's last exchange

As in the forward, the [b, d] work is split by rows (`gpu_cluster_lib.row_block`): each sum
gives CTA c its 16 rows only, and c computes the LayerNorm VJPs (the output's D2 and
LayerNorm-L2's) on them, shares D2 and ct_Z2 (wgmma operands of every slice) with
`Cluster.share`, and writes its rows of d XQ, d XK, d XV and d eta. The column sums over the
rows (b2's cotangent, which every CTA needs at once, goes into the next exchange as "v"; the
LayerNorm parameters' cotangents are returned per CTA and summed by `backward_group`) are
partial per CTA. Sums use slots 0, 1 (the forward's two), then 0, 2 (ct_eG2, ct_P), then 2, 1
(ct_XK, ct_XQ), so that no barrier has to end a mini-batch: a CTA writes each exchange buffer
(slot, vector or shared tile) again only after passing a later cluster barrier than the one
behind which its peers read it (`sum`'s and `share`'s barriers: seven a mini-batch).

What keeps the loop short: the rows split; `mini_batch` handing over gelu'(Z1), G1, Q =
(G2 W2^T) gelu''(Z1) and gelu'(Z1_bar) from the tanh it computes anyway; one accumulator for
each state cotangent, with -eta G1, -eta G2 as the staged operands (every product with them is
subtracted); matmuls issued where their operands are ready and waited on where used
(`gpu_cluster_lib.matmul_during`), every product that nothing waits on soon (ct_X2's and ct_XK's
terms from the steps, W2's cotangent step ct_P^T G2, ct_XQ) beside the longest stretch of
CUDA-core work, the rows' LayerNorm-L2 VJP; what the VJP uses only much later parked in shared
memory (gelu'(Z1) and Q in bf16, G1 in f32 in the third partial-sum slot).
"""
from __future__ import annotations

import types

import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.ttt.gpu_cluster_lib import (ROW, WGMMA, Cluster, Rows, cols, load_col,
                                                load_rows, matmul_during, rows, stage)
from pallas_kernels.ttt.gpu_cluster_step import (Recompute, ln_backward, ln_l2_grad_vjp,
                                                 normalize, transpose, w2_operands)


def mini_batch_vjp(s: types.SimpleNamespace, r: Recompute, carry, eps: float, cl: Cluster,
                   block: Rows, load_next, interpret=False, w2_transposed: bool = False):
  """Pulls the cotangents back through one mini-batch that `mini_batch` (backward mode) has
  just recomputed, on the CTA's hidden slice and `block`, its rows of the [b, d] work.

  s: the shared-memory buffers `mini_batch` took and filled (its docstring), with s.w1_new,
  s.w2_new holding W1', W2' and s.q (Q) the same tile as s.ctp, and the VJP's own: cto [b, d]
  (ct_out, bf16, loaded); d2 [b, d], cw1 [d, fp], cw2 (W2-shaped), ctp [b, fp] (staged
  operands: D2 then ct_Z2, ct_W1', ct_W2', ct_P then ct_G1 gelu'(Z1)); ctq, dxv [b, d] (d XQ's
  and d XV's rows out; ctq may be x2_bar's tile, dxv w2_new's); part [3, b, d] f32 (the
  partial-sum slots; slot 1 carries ct_XQ's part); f32 vectors vb1 [fp], vb2 [d] (the
  cotangents of b1, b2, accumulated), ctln [2, d] (gamma's and beta's, accumulated), deta [b]
  (d eta's rows out). r: `mini_batch`'s results. carry: (CW1 [d, fp], CW2, W2-shaped), the f32
  cotangents of W1, W2 after the mini-batch, in registers (WGMMA). cl: the `Cluster`, with the
  slots 0-2 and the vectors "eta" [b] and "v" [d]. load_next(): issues the next mini-batch's
  loads, called once this one's inputs are dead. w2_transposed: the W2-shaped tiles hold W2^T
  (`gpu_cluster.w2_transposed`).

  Returns the cotangents of W1, W2 before the mini-batch, (CW1, CW2), and leaves the CTA's rows
  of d XQ, d XK, d XV, d eta in s.ctq, s.xk, s.dxv, s.deta (the caller copies them out).
  """
  tr, f32 = w2_transposed, jnp.float32
  CW1, CW2 = carry
  b, d = s.xq.shape
  bf, bd = (b, s.w1.shape[1]), (b, d)
  eta_block = block._replace(layout=block.row)  # the CTA's rows of [b] vectors
  T = transpose
  # A W2-shaped tile as the [fp, d] and the [d, fp] operand; a step of W2's cotangent,
  # CW2 += A^T B (A [b, fp], B [b, d]), as CW2^T += B^T A at tr.
  fd, df, cw2_step = w2_operands(tr)
  dX2 = lambda: plgpu.load(s.dx2, layout=WGMMA).astype(f32)  # gelu'(Z1), loaded where used
  rd = r.Z2.shape  # [rows, d]: the CTA's rows of the [b, d] work
  col = lambda ref: cols(load_col(ref, block.col), rd)  # a [d] vector, broadcast

  def add_col(ref, v):  # accumulate into a [d] vector in shared memory
    ref[...] = load_col(ref, block.col) + v

  # out = XQ + gamma * x_hat(Z2_bar) + beta: D2 = ct of Z2_bar, on the CTA's rows, shared.
  x_hat, rstd = normalize(r.Z2_bar, eps)
  ct_out = load_rows(s.cto, block)
  ct_gamma_out = ct_out * x_hat  # [rows, d], summed over the rows with LN-L2's part
  D2 = ln_backward(x_hat, rstd, ct_out * col(s.ln.at[0]))
  def inside():  # during the barrier's round trip: ct_W1 staged, D2's column sum
    stage((s.cw1, CW1))
    return D2.sum(axis=0)  # [d], the rows' part of b2's cotangent
  dD2 = cl.share(block, ("d2", D2), during=inside)

  # Z2_bar = X2_bar W2' + b2': ct_X2_bar = D2 W2'^T, and the cotangent of W2' is
  # CW2 + X2_bar^T D2 (staged: every later product with it pulls it back through W2's step
  # W2' = W2 - X2^T eG2). Z1_bar = XQ W1' + b1': D1 = ct of Z1_bar, and W1' likewise.
  def d1(done):  # D1 and ct_b1', while XK's term of ct_eG1 and ct_W2' are computed
    D1 = done(0) * plgpu.load(s.d1, layout=WGMMA).astype(f32)  # gelu'(Z1_bar), parked
    stage((s.d1, D1))
    Cb1 = load_col(s.vb1) + D1.sum(axis=0)
    s.vb1[...] = Cb1
    stage((s.cw2, done(2)))
    return Cb1
  Cb1, (_, ct_eG1, CW2) = matmul_during(
      [(bf, [(s.d2, df(s.w2_new))]), (bf, [(s.xk, s.cw1)]),
       (CW2, [cw2_step(s.x2_bar, s.d2)])], d1, interpret)

  # W1' = W1 - XK^T eG1, b1' = b1 - colsum(eG1): ct_eG1 = -(XK ct_W1' + ct_b1'), with
  # XK ct_W1' = XK CW1 + (XQ XK^T)^T D1 (not waiting for ct_W1' = CW1 + XQ^T D1 to be staged).
  # eG1 = eta G1, G1 = (G2 W2^T) gelu'(Z1), eG2 = eta G2: ct_G2 summed over the cluster.
  def g1(done):  # while -ct_eG2's part (from W2's step) and ct_W1' are computed
    # eta, Q (parked in ct_P's tile) and gelu'(Z1) loaded while ct_eG1 is computed
    eta, Q, dx2 = (plgpu.load(s.eta, layout=ROW), plgpu.load(s.ctp, layout=WGMMA),
                   plgpu.load(s.dx2, layout=WGMMA))
    ct_eG1 = -(done(0) + cols(Cb1, bf))
    ct_G1 = rows(eta, bf) * ct_eG1
    ct_Z1 = ct_G1 * Q.astype(f32)
    stage((s.ctp, ct_G1 * dx2.astype(f32)))  # ct of P = G2 W2^T
    # ct_eta: [b], this slice's part; ct_Z1: X2's share is added below.
    return (ct_eG1 * plgpu.load(s.g1, layout=WGMMA)).sum(axis=1), ct_Z1
  (ct_eta, ct_Z1), (_, neg_ct_eG2, CW1) = matmul_during(
      [(ct_eG1, [(T(s.attn), s.d1)]), (bd, [(s.x2, fd(s.cw2))]), (CW1, [(T(s.xq), s.d1)])],
      g1, interpret)

  def publish(done):  # -ct_eG2 and ct_P summed while ct_P is computed; ct_W1' staged
    stage((s.cw1, CW1))  # (ct_XQ waits for ct_XK's sum: only d XQ needs it)
    return cl.sum((0, neg_ct_eG2, block), (2, lambda: done(0), block), ("v", dD2, block.col))
  (ct_eG2, ct_P, dD2), _ = matmul_during([(bd, [(s.ctp, fd(s.w2))])], publish)
  # b2's cotangent before its update is -(ct of colsum(eG2)), in Z2_bar and in b2's update.
  vb2 = load_col(s.vb2, block.col) + dD2
  s.vb2[...] = vb2

  def rows_work(done):  # the [rows, d] work, while X2's and XK's other terms are computed
    del done
    ct_eG2_ = -(ct_eG2 + cols(vb2, rd))
    eta_rows = plgpu.load(s.eta.at[block.ds], layout=block.row)
    ct_G2 = rows(eta_rows, rd) * ct_eG2_ + ct_P
    ct_eta_rows = (ct_eG2_ * r.G2).sum(axis=1)  # [rows]: eG2's share of ct_eta
    # d XQ = ct_out + ct_XQ's sum: ct_out's rows wait in s.ctq (X2_bar's tile, dead now, where
    # fp = d; the next mini-batch's ct_out is loaded over s.cto before the sum).
    s.ctq.at[block.ds][...] = plgpu.load(s.cto.at[block.ds], layout=block.layout)
    # G2 = LN-L2 gradient of Z2 = X2 W2 + b2 at target XV - XK; X2 = gelu(Z1 = XK W1 + b1).
    ct_Z2, ct_T, dgamma, dbeta = ln_l2_grad_vjp(
        r.Z2, load_rows(s.xv, block) - load_rows(s.xk, block),
        load_col(s.ln.at[0], block.col), load_col(s.ln.at[1], block.col),
        eps, r.G2, ct_G2, ct_gamma_out, load_rows(s.cto, block))
    def inside():  # during the barrier's round trip
      add_col(s.ctln.at[0], dgamma)
      add_col(s.ctln.at[1], dbeta)
      return ct_Z2.sum(axis=0)
    return ct_eta_rows, ct_T, cl.share(block, ("d2", ct_Z2), during=inside)  # (D2 is dead)
  # X2 meets Z2 (W2) and W2's step (-eG2 ct_W2'^T); XK meets Z1 (W1) and W1's step
  # (-eG1 ct_W1'^T). The terms without ct_Z2 or ct_Z1 are computed during the rows' work,
  # with W2's cotangent step ct_P^T G2 and this slice's part of ct_XQ = D1 W1'^T.
  (ct_eta_rows, ct_T, dZ2), (ct_X2, ct_XK, CW2, ct_XQ) = matmul_during(
      [(bf, [(s.neg_eg2, df(s.cw2))]), (bd, [(s.neg_eg1, T(s.cw1))]),
       (CW2, [cw2_step(s.ctp, s.g2)]), (bd, [(s.d1, T(s.w1_new))])], rows_work, interpret)

  def d1(done):  # ct_Z1, D1's tile, while W2's cotangent is accumulated
    # XQ, XV, ct_out, eta, b1, b2 and the three tiles the kernel's loads ahead use
    # (`gpu_cluster_backward`'s `load`) are dead here (their last readers: the matmuls above,
    # and rows_work before its cluster barrier): the next mini-batch's inputs are loaded
    # during the rest of this one.
    load_next()
    s.part.at[1][...] = ct_XQ  # published for xk_sum's exchange
    ct_Z1_ = ct_Z1 + done(0) * dX2()
    stage((s.d1, ct_Z1_))
    return ct_Z1_
  ct_Z1, (_, CW2) = matmul_during(
      [(ct_X2, [(s.d2, df(s.w2))]), (CW2, [cw2_step(s.x2, s.d2)])], d1, interpret)
  def xk_sum(done):  # while W1's cotangent is accumulated (it reads s.xk: written after)
    def inside():  # during the barrier's round trip
      s.vb1[...] = load_col(s.vb1) + ct_Z1.sum(axis=0)
      s.dxv.at[block.ds][...] = ct_T.astype(s.dxv.dtype)  # d XV's rows, out by the caller
    ct_eta_, dZ2_, ct_XQ_, ct_XK_, _ = cl.sum(
        ("eta", ct_eta, eta_block), ("v", dZ2, block.col), (1, None, block),
        (2, lambda: done(0), block), during=inside)
    add_col(s.vb2, dZ2_)
    return ct_XK_, ct_XQ_, ct_eta_
  (ct_XK, ct_XQ, ct_eta), (_, CW1) = matmul_during(
      [(ct_XK, [(s.d1, T(s.w1))]), (CW1, [(T(s.xk), s.d1)])], xk_sum, interpret)

  # The CTA's rows of d XQ, d XK, d XV and d eta, out through tiles free now (s.ctq, XK's
  # and s.dxv: X2_bar's and W2''s where fp = d; the next mini-batch writes them after these
  # leave).
  s.ctq.at[block.ds][...] = (load_rows(s.ctq, block) + ct_XQ).astype(s.ctq.dtype)
  s.xk.at[block.ds][...] = (ct_XK - ct_T).astype(s.xk.dtype)
  s.deta.at[block.ds][...] = ct_eta + ct_eta_rows
  return CW1, CW2
