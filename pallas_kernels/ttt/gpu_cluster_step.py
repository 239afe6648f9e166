"""The TTT-MLP mini-batch on one CTA's slice of the hidden width, as the cluster kernels run it
(`gpu_cluster.py` forward, `gpu_cluster_backward.py` backward; see `gpu_cluster.py` for the
split and why it is exact): `mini_batch`, the forward half of one mini-batch, and the row
statistics of the [b, d] work it and the backward's VJP (`gpu_cluster_vjp.py`) share
(LayerNorm, the LayerNorm-L2 gradient and its VJP). The Mosaic GPU plumbing they run on
(wgmma, the cluster's sums, `Rows`) is `gpu_cluster_lib.py`.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.ttt.gpu_cluster_lib import (ROW, cols, load_col, load_rows, matmul,
                                                matmul_during, rows, stage)
from ttt_jax.ops.ttt import gelu_tanh_and_grad, gelu_tanh_grad2


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


def ln_l2_grad_vjp(z, target, gamma, beta, eps, G, ct_G, more_gamma=0, more_beta=0):
  """VJP of `ln_l2_grad` (G = LNback(x_hat, rstd, u), u = gamma (gamma x_hat +
  beta - target), given as computed by the forward): the cotangents of z, target, gamma [d]
  and beta [d] given ct_G [b, d]; more_gamma, more_beta [b, d]: other per-row terms of the
  last two, summed over the rows with them (one column sum each). LNback is self-adjoint in u;
  x_hat and rstd are then differentiated through z."""
  bd = z.shape
  d = bd[1]
  mean = lambda v: rows(v.sum(axis=1) / d, bd)
  x_hat, rstd = normalize(z, eps)
  g_, b_ = cols(gamma, bd), cols(beta, bd)
  u = g_ * (g_ * x_hat + b_ - target)
  ct_u = ln_backward(x_hat, rstd, ct_G)
  r = rows(rstd, bd)
  ct_x_hat = g_ * g_ * ct_u - r * (mean(u * x_hat) * ct_G + mean(ct_G * x_hat) * u)
  ct_z = ln_backward(x_hat, rstd, ct_x_hat) - r * mean(ct_G * G) * x_hat
  ct_gamma = (ct_u * (2 * g_ * x_hat + b_ - target) + more_gamma).sum(axis=0)
  return ct_z, -g_ * ct_u, ct_gamma, (ct_u * g_ + more_beta).sum(axis=0)


def transpose(ref):
  """A 2-D shared-memory ref seen transposed (a wgmma operand view; no data moves)."""
  return ref.transpose((1, 0))


def w2_operands(w2_transposed: bool):
  """How a W2-shaped tile (W2, W2' or their cotangent: [fp, d], or W2^T [d, fp] where
  `w2_transposed`) enters the wgmma products: (fd, df, step), where fd(ref) and df(ref) are the
  tile as its [fp, d] and its [d, fp] operand, and step(A, B) is the operand pair of a
  W2-shaped product A^T B (A [b, fp], B [b, d]), taken as B^T A for the transpose."""
  same = lambda ref: ref
  if w2_transposed:
    return transpose, same, lambda a, b: (transpose(b), a)
  return same, transpose, lambda a, b: (transpose(a), b)


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
  T = transpose
  # W2 [fp, d] and W2^T [d, fp] as wgmma operands, and W2's step -X2^T eG2 (its transpose
  # -eG2^T X2 when the state holds W2^T).
  fd, df, w2_product = w2_operands(w2_transposed)
  w2, w2_t, w2_step = fd(s.w2), df(s.w2), w2_product(s.x2, s.neg_eg2)

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
        [(bf, [(s.xk, s.w1)]), ((b, b), [(s.xq, T(s.xk))]),
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
    # gelu'(Z1) is parked in shared memory inside the barrier (the VJP's uses are far off).
    def park():
      s.dx2[...] = dX2.astype(s.dx2.dtype)
    # Z2_bar = X2_bar W2' + b2': its product runs on the tensor cores across the barrier.
    _, (part,) = matmul_during(
        [(bd, [(s.x2_bar, fd(s.w2_new))])],
        lambda done: cl.share(block, ("neg_eg2", -eG2), ("g2", G2), during=park), interpret)

    def g1(done):  # while G2 W2^T is computed
      P = done(0)
      G1 = P * dX2
      # Parked in shared memory (the VJP's uses are far off): G1 and Q.
      s.q[...] = (P * ddX2).astype(s.q.dtype)
      s.g1[...] = G1
      stage((s.neg_eg1, -(rows(plgpu.load(s.eta, layout=ROW), bf) * G1)))
    matmul_during([(bf, [(s.g2, w2_t)])], g1, interpret)
    Z2_bar, = cl.sum((1, part, block))
    return Recompute(Z2, G2, Z2_bar + cols(stepped[1], rd), None, None, None, None)

  # The forward: eta scales rows, eta G1 = ((eta G2) W2^T) gelu'(Z1), and G2 is not needed.
  # db2 [d], colsum(eta G2) over the CTA's rows: in the step alone (output=False) summed
  # inside the barrier, its shuffles and cross-warp sum overlapping the round trip; with the
  # output, while Z2_bar's product is computed (measured both ways: `kernel_resources.py`).
  colsum_eG2 = lambda *_: eG2.sum(axis=0)
  db2 = cl.share(block, ("neg_eg2", -eG2), during=None if output else colsum_eG2)
  W1, W2 = state
  if not output:  # the step alone: W2's during eta G1, W1's while W2' is staged
    def g1(done):
      neg_eG1 = done(0) * dX2
      stage((s.neg_eg1, neg_eG1))
      return neg_eG1
    neg_eG1, (_, W2) = matmul_during(
        [(bf, [(s.neg_eg2, w2_t)]), (W2, [w2_step])], g1, interpret)
    def w2_new(done):
      if before_stage:
        before_stage()
      stage((s.w2, W2))
      return -neg_eG1.sum(axis=0)  # db1 [fp]
    db1, (W1,) = matmul_during([(W1, [(T(s.xk), s.neg_eg1)])], w2_new,
                               interpret)
    stage((s.w1, W1))
    db2, = cl.sum(("db2", db2, block.col))
    return Recompute(Z2, G2, None, db1, db2, W1, W2)
  neg_eG1 = matmul(bf, (s.neg_eg2, w2_t)) * dX2
  stage((s.neg_eg1, neg_eG1))

  # W1' = W1 - XK^T eG1, b1' = b1 - colsum(eG1) (db1, summed while W1' is computed), and
  # Z1_bar = XQ W1' + b1'; W2' = W2 - X2^T eG2 during gelu(Z1_bar).
  colsum = lambda done: -neg_eG1.sum(axis=0)  # db1 [fp]
  db1, (W1,) = matmul_during([(W1, [(T(s.xk), s.neg_eg1)])], colsum, interpret)
  if before_stage:
    before_stage()
  stage((s.w1, W1))

  def gelu_bar(done):
    stage((s.x2_bar, gelu_tanh_and_grad(done(0))[0]))
  _, (_, W2) = matmul_during([(cols(b1 - db1, bf), [(s.xq, s.w1)]),
                              (W2, [w2_step])], gelu_bar, interpret)
  stage((s.w2, W2))
  db2, (part,) = matmul_during([(bd, [(s.x2_bar, w2)])], colsum_eG2, interpret)
  Z2_bar, db2 = cl.sum((1, part, block), ("db2", db2, block.col))
  return Recompute(Z2, G2, Z2_bar + cols(b2 - db2, rd), db1, db2, W1, W2)
