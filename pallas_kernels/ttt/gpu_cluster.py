"""TTT-MLP forward as a Mosaic GPU kernel whose state is split across a cluster of CTAs (Hopper).

Why: at d = 64 one head's f32 state (W1 [64, 256] + W2 [256, 64], 128 KiB) plus the
mini-batch's temporaries do not fit one SM, and one program per (batch, head) leaves most SMs
idle at the 5B shape (48 heads on 132 SMs). Here the inner MLP's hidden width f = 4d is split
over a cluster of P CTAs: CTA c holds W1[:, c*f/P:(c+1)*f/P], b1's slice and W2's matching
rows, and the P CTAs of a (batch, head) walk the mini-batches together, so the grid is
B x H x P CTAs (P = 4: 192 at 48 heads) and each holds 1/P of the state.

The split is exact because the hidden width only meets the rest of the mini-batch through sums
over it. With X2 = gelu(XK W1 + b1), everything per hidden slice stays local (Z1, X2, G1, the
W1/b1/W2 updates, Z1_bar, X2_bar) except two [b, d] sums, exchanged through distributed shared
memory (each CTA reads its peers' partials with `plgpu.cluster_ref`) between cluster-wide
barriers (`barrier.cluster` arrive.release / wait.acquire, so the writes are visible):

  Z2     = sum_c X2_c W2_c + b2
  Z2_bar = sum_c [X2_bar_c W2_c - (X2_bar_c X2_c^T) (eta * G2)] + b2 - colsum(eta * G2)

(the second term is linear in the partial Gram matrices, so it is summed with them). G2, the
LayerNorm-L2 gradient of Z2, and the output XQ + LN(Z2_bar) are computed redundantly by all P
CTAs (b x d work). The matmuls run on the tensor cores (`wgmma`) with bf16 operands and f32
accumulation; the state stays f32 in registers and a bf16 copy of W1 and W2 in shared memory
feeds the matmuls, so the output differs from the f32 pure op by bf16 rounding (measured 4e-3
to 8e-3 relative). The math is `tile.mini_batch` rearranged for the split; the tests compare
it with the pure op. Operands computed in registers are staged through shared memory (jax's
interpreter takes only shared-memory wgmma operands, and one code path serves both).

Scope (`supports`): TTT-MLP, bf16 inputs, b = 64 (a wgmma tile is 64 rows), d = 64 with
cluster = 4 (the scratch must fit 227 KiB of shared memory: `smem_bytes`); checkpoints as
`gpu.forward` returns them (or W1, W2 in bf16: `weights_dtype`, the backward's stack of
states). Mini-batch n + 1's inputs are loaded (TMA) while n is computed. The backward on the
same split is `gpu_cluster_backward.py` (`gpu.backward` recomputes each group with this kernel,
then sweeps it in reverse there); its forward half is `mini_batch` here, shared by both. Not
yet done: warp specialisation.
In interpret mode (CPU) jax's Mosaic GPU interpreter has no distributed shared memory, so there
the partials go through a global-memory scratch instead; the compiled path is checked by
lowering and compiling for an H100 (compile-only devices) and has not yet run on a GPU.
"""
from __future__ import annotations

import functools
import math
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.ttt.tile import num_groups
from ttt_jax.ops.ttt import gelu_tanh, gelu_tanh_grad

_WGMMA = plgpu.Layout.WGMMA
_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per row of a WGMMA tile: [b]
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per column: [n]


# Shared memory per block on Hopper (H100, H200): 227 KiB with the opt-in.
SMEM_LIMIT_BYTES = 227 << 10
# Mosaic GPU's own shared memory beside the scratch list (cross-warp reductions), measured by
# compiling for an H100 at d = 64, cluster = 4: 5.5 KiB in the forward, 8.9 KiB in the
# backward (195,584 and 224,256 B asked for).
MOSAIC_RESERVE_BYTES = 10 << 10


def smem_bytes(b: int, d: int, cluster: int, interpret: bool = False) -> int:
  """Shared memory of one CTA: the sum over `forward`'s scratch list (barriers aside)."""
  return sum(math.prod(r.shape) * jnp.dtype(r.dtype).itemsize
             for r in _scratch(b, d, cluster, jnp.bfloat16, interpret)
             if isinstance(r, pl.MemoryRef))


def supports(kind: str, dtype, b: int, d: int, cluster: int) -> bool:
  """Whether this kernel handles the shape; otherwise `gpu.forward` (Triton) does.

  TTT-MLP with bf16 inputs and b = 64 (a wgmma tile has 64 rows), a hidden slice of 64 units or
  a multiple (the W2 slice's update is a wgmma tile too), and the scratch within one SM's shared
  memory: at d = 64 that is cluster = 4 (186 KiB; cluster = 2 needs 258 KiB). d = 128 does
  not fit yet (cluster = 8: 338 KiB), nor does d < 64 (its W1 update tile has d < 64 rows).
  """
  f = 4 * d
  return (kind == "ttt_mlp" and jnp.dtype(dtype) == jnp.bfloat16 and b == 64 and d >= 64
          and f % cluster == 0 and (f // cluster) % 64 == 0
          and smem_bytes(b, d, cluster) + MOSAIC_RESERVE_BYTES <= SMEM_LIMIT_BYTES)


def _swizzled(shape, dtype):
  """A shared-memory tile laid out for wgmma operands (128-byte swizzle)."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(shape[-1] * itemsize * 8)
  transforms = (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))
  return plgpu.SMEM(shape, dtype, transforms=transforms)


def _scratch(b, d, cluster, dtype, interpret):
  """The CTA's scratch, in `_kernel`'s order: shared-memory buffers, then barriers."""
  fp, f32, bf16 = 4 * d // cluster, jnp.float32, jnp.bfloat16
  return (
      _swizzled((2, b, d), dtype), _swizzled((2, b, d), dtype),  # XQ, XK (2 buffers)
      _swizzled((2, b, d), dtype), plgpu.SMEM((2, b), f32),  # XV, eta
      _swizzled((b, d), dtype),  # out
      _swizzled((d, fp), bf16), _swizzled((fp, d), bf16),  # W1, W2 operands
      _swizzled((b, fp), bf16), _swizzled((b, fp), bf16),  # X2, X2_bar
      _swizzled((b, fp), bf16),  # eta * G1
      _swizzled((b, d), bf16), _swizzled((b, d), bf16),  # eta * G2, G2
      _swizzled((b, b), bf16),  # -XQ XK^T, then -X2_bar X2^T
      plgpu.SMEM((2, b, d), f32),  # this CTA's partial sums
      plgpu.SMEM((b, d) if interpret else (8,), f32),  # a peer's, received (interpret only)
      plgpu.SMEM((d, fp), f32), plgpu.SMEM((fp,), f32), plgpu.SMEM((fp, d), f32),
      plgpu.SMEM((d,), f32), plgpu.SMEM((2, d), f32),  # state stage, gamma/beta
      plgpu.Barrier(num_arrivals=6), plgpu.Barrier(num_arrivals=4, num_barriers=2),
      plgpu.Barrier(num_arrivals=1),
      plgpu.ClusterBarrier(collective_axes=("cluster",)),
  )


def _matmul(shape, *products):
  """The sum of a @ b over the (a, b) products on the tensor cores (wgmma), f32 [m, n]; a and b
  are shared-memory refs (transposed views allowed)."""
  def body(acc_ref):
    for a, b in products:
      plgpu.wgmma(acc_ref, a, b)
    plgpu.wgmma_wait(0)
    return acc_ref[...]
  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


@plgpu.inline_mgpu()
def _cluster_sync(ctx):
  """All threads of the cluster's CTAs meet; each CTA's earlier shared-memory writes are then
  visible to the others (release/acquire at cluster scope, as CUTLASS's cluster_sync)."""
  del ctx
  mgpu_utils.inline_ptx("barrier.cluster.arrive.release.aligned;", has_side_effects=True)
  mgpu_utils.inline_ptx("barrier.cluster.wait.acquire.aligned;", has_side_effects=True)


def _rows(v, shape):  # [m] -> [m, n]
  return lax.broadcast_in_dim(v, shape, [0])


def _cols(v, shape):  # [n] -> [m, n]
  return lax.broadcast_in_dim(v, shape, [1])


# The row statistics below restate `ttt_jax.ops.ttt.layer_norm` / `ln_l2_grad` with reductions
# to [b] and `broadcast_in_dim` back, because Mosaic GPU's layout inference finds no layout for
# their keepdims [b, 1] intermediates (tried: "Layout inference failed to find a solution").
# The tests hold them to the pure op.
def _normalize(z, eps):
  """(z - mean) * rstd per row, and rstd [b]."""
  d = z.shape[1]
  mu = z.sum(axis=1) / d
  zc = z - _rows(mu, z.shape)
  rstd = lax.rsqrt((zc * zc).sum(axis=1) / d + eps)
  return zc * _rows(rstd, z.shape), rstd


def _ln_backward(x_hat, rstd, u):
  """The cotangent of z given u, the cotangent of x_hat = LN(z) without the affine map:
  rstd * (u - mean(u) - x_hat * mean(u * x_hat)) per row."""
  d = x_hat.shape[1]
  mean = lambda v: _rows(v.sum(axis=1) / d, x_hat.shape)
  return _rows(rstd, x_hat.shape) * (u - mean(u) - x_hat * mean(u * x_hat))


def _ln_l2_grad(z, target, gamma, beta, eps):
  """`ttt_jax.ops.ttt.ln_l2_grad` with row reductions as WGMMA-layout sums."""
  x_hat, rstd = _normalize(z, eps)
  u = (_cols(gamma, z.shape) * x_hat + _cols(beta, z.shape) - target) * _cols(gamma, z.shape)
  return _ln_backward(x_hat, rstd, u)


class _Cluster:
  """The P CTAs of one (batch, head): cluster-wide barriers and sums of per-CTA partials.

  Partials are published in shared-memory buffers, `buf(key)`, and read by the peers through
  distributed shared memory (`plgpu.cluster_ref`) after a cluster barrier. A buffer may be
  written again once every peer has passed a later barrier (all have read it by then), which is
  how the kernels choose their keys. Interpreter: the partials go through the global-memory
  scratch `xch(key, peer)` and are fetched into `recv(key)` (it has no distributed shared
  memory).
  """

  def __init__(self, c, size, interpret, cbar, recv_bar, buf, xch, recv):
    self.c, self.size, self.interpret = c, size, interpret
    self.cbar, self.recv_bar, self.buf, self.xch, self.recv = cbar, recv_bar, buf, xch, recv

  def sync(self):
    if self.interpret:  # the interpreter models cluster barriers, not inline PTX
      plgpu.barrier_arrive(self.cbar)
      plgpu.barrier_wait(self.cbar)
    else:
      _cluster_sync()

  def sum(self, *parts):
    """(key, value, layout) partials -> their sums over the cluster, after one barrier."""
    for key, value, _ in parts:
      self.buf(key)[...] = value
    if self.interpret:
      plgpu.commit_smem()
      for key, _, _ in parts:
        plgpu.copy_smem_to_gmem(self.buf(key), self.xch(key, self.c))
      plgpu.wait_smem_to_gmem(0)
    self.sync()
    totals = []
    for key, value, layout in parts:
      total = value
      for k in range(1, self.size):
        peer = lax.rem(self.c + k, self.size)
        if self.interpret:
          plgpu.copy_gmem_to_smem(self.xch(key, peer), self.recv(key), self.recv_bar)
          plgpu.barrier_wait(self.recv_bar)
          total = total + plgpu.load(self.recv(key), layout=layout)
          plgpu.commit_smem()  # this read before the next copy into recv (async proxy)
        else:
          peer_buf = plgpu.cluster_ref(self.buf(key), {"cluster": peer})
          total = total + plgpu.load(peer_buf, layout=layout)
      totals.append(total)
    return totals


def stage(*pairs):
  """wgmma operands computed in registers, (ref, value) pairs, written to shared memory and
  fenced once (wgmma reads them there; jax's interpreter takes only shared-memory operands)."""
  for ref, value in pairs:
    ref[...] = value.astype(ref.dtype)
  plgpu.commit_smem()


class Recompute(NamedTuple):
  """What `mini_batch` computes, the registers (f32) the backward differentiates through."""
  Z1: jax.Array  # [b, fp] XK W1 + b1
  P: jax.Array  # [b, fp] G2 W2^T (G1 = P * gelu'(Z1): fewer live registers than keeping G1)
  Z2: jax.Array  # [b, d] X2 W2 + b2, summed over the cluster
  G2: jax.Array  # [b, d] the LayerNorm-L2 gradient of Z2
  Z1_bar: jax.Array  # [b, fp]
  Z2_bar: jax.Array  # [b, d], summed over the cluster
  db1: jax.Array  # [fp] colsum(eta G1)
  db2: jax.Array  # [d] colsum(eta G2)


def mini_batch(s, eta, b1, b2, gamma, beta, eps, cluster_sum):
  """One mini-batch of the split TTT-MLP up to Z2_bar (`tile.mini_batch` rearranged, see the
  module docstring), on the CTA's hidden slice.

  s: shared-memory buffers with xq, xk, xv [b, d] and w1 [d, fp], w2 [fp, d] (bf16) loaded;
  written here: x2, x2_bar, eg1 [b, fp], g2, eg2 [b, d] and neg_b, neg_a [b, b] (-XQ XK^T,
  -X2_bar X2^T; the forward passes one buffer for both). eta [b], b1 [fp], b2 [d], gamma, beta
  [d]: f32 registers. cluster_sum(part, slot): the sum of a [b, d] partial over the cluster
  (slots 0 and 1).
  """
  b, d = s.xq.shape
  fp = s.w1.shape[1]
  bf, bd = (b, fp), (b, d)

  # Z1 = XK W1 + b1; X2 = gelu(Z1); Z2 = X2 W2 + b2 (summed over the cluster).
  Z1 = _matmul(bf, (s.xk, s.w1)) + _cols(b1, bf)  # [b, fp]
  X2 = gelu_tanh(Z1)
  stage((s.x2, X2))
  Z2 = cluster_sum(_matmul(bd, (s.x2, s.w2)), 0) + _cols(b2, bd)  # [b, d]

  # Gradients of the reconstruction loss: G2 = dl/dZ2 (redundant per CTA), G1 = dl/dZ1.
  XK = plgpu.load(s.xk, layout=_WGMMA).astype(jnp.float32)
  XV = plgpu.load(s.xv, layout=_WGMMA).astype(jnp.float32)
  G2 = _ln_l2_grad(Z2, XV - XK, gamma, beta, eps)
  eG2 = _rows(eta, bd) * G2
  stage((s.eg2, eG2), (s.g2, G2))
  P = _matmul(bf, (s.g2, s.w2.transpose((1, 0))))
  G1 = P * gelu_tanh_grad(Z1)
  eG1 = _rows(eta, bf) * G1
  stage((s.eg1, eG1))

  # Dual form, f(XQ; W') without forming W' (as the pure op): Z1_bar = XQ W1 - (XQ XK^T) eG1
  # + b1 - colsum(eG1), and likewise Z2_bar.
  stage((s.neg_b, -_matmul((b, b), (s.xq, s.xk.transpose((1, 0))))))
  db1 = eG1.sum(axis=0)  # [fp]
  Z1_bar = _matmul(bf, (s.xq, s.w1), (s.neg_b, s.eg1)) + _cols(b1 - db1, bf)
  stage((s.x2_bar, gelu_tanh(Z1_bar)))
  stage((s.neg_a, -_matmul((b, b), (s.x2_bar, s.x2.transpose((1, 0))))))
  part = _matmul(bd, (s.x2_bar, s.w2), (s.neg_a, s.eg2))
  db2 = eG2.sum(axis=0)  # [d]
  Z2_bar = cluster_sum(part, 1) + _cols(b2 - db2, bd)
  return Recompute(Z1, P, Z2, G2, Z1_bar, Z2_bar, db1, db2)


def _kernel(xq_g, xk_g, xv_g, eta_g, gamma_g, beta_g, w1_g, b1_g, w2_g, b2_g,
            out_g, ck_w1, ck_b1, ck_w2, ck_b2, xch_g, scratch, *, eps, g, num_mini_batches,
            cluster, interpret, per_example_init):
  """One CTA: hidden slice c of head h, batch element i. Inputs are GMEM refs
  x [B, H, N, b, d] bf16, eta [B, H, N, b] f32, gamma/beta [H, d] f32, the initial state
  [H, ...] ([B, H, ...] per example) f32; outputs out [B, H, N, b, d], the checkpoints
  [B, H, G, ...] (W1 and W2 in f32 or bf16) and (interpret only) the exchange scratch
  [B, H, P, 2, b, d]."""
  (xq_2, xk_2, xv_2, eta_2, out_s, w1b_s, w2b_s, x2_s, x2bar_s, eg1_s, eg2_s, g2_s, attn_s,
   part_s, recv_s,
   st_w1, st_b1, st_w2, st_b2, vec_s, init_bar, load_bar, recv_bar, cbar) = scratch
  i, h, c = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("cluster")
  b, d = out_s.shape
  fp = w1b_s.shape[1]
  hid = pl.ds(c * fp, fp)  # this CTA's slice of the hidden width
  bf16_weights = ck_w1.dtype == jnp.bfloat16  # the backward's state stack: W1, W2 as operands
  cl = _Cluster(c, cluster, interpret, cbar, recv_bar, buf=lambda k: part_s.at[k],
                xch=lambda k, peer: xch_g.at[i, h, peer, k], recv=lambda k: recv_s)

  def fetch(pairs, bar, wait=True):
    for src, dst in pairs:
      plgpu.copy_gmem_to_smem(src, dst, bar)
    if wait:
      plgpu.barrier_wait(bar)

  def prefetch(n):  # mini-batch n's inputs into buffer n % 2, in flight during mini-batch n - 1
    slot = lax.rem(n, 2)
    fetch([(xq_g.at[i, h, n], xq_2.at[slot]), (xk_g.at[i, h, n], xk_2.at[slot]),
           (xv_g.at[i, h, n], xv_2.at[slot]), (eta_g.at[i, h, n], eta_2.at[slot])],
          load_bar.at[slot], wait=False)

  # LayerNorm parameters and the initial state slice, f32.
  head = (lambda r: r.at[i, h]) if per_example_init else (lambda r: r.at[h])
  fetch([(gamma_g.at[h], vec_s.at[0]), (beta_g.at[h], vec_s.at[1]),
         (head(w1_g).at[:, hid], st_w1), (head(b1_g).at[0, hid], st_b1),
         (head(w2_g).at[hid, :], st_w2), (head(b2_g).at[0], st_b2)], init_bar)
  gamma = plgpu.load(vec_s.at[0], layout=_COL)
  beta = plgpu.load(vec_s.at[1], layout=_COL)
  state = (plgpu.load(st_w1, layout=_WGMMA), plgpu.load(st_b1, layout=_COL),
           plgpu.load(st_w2, layout=_WGMMA), plgpu.load(st_b2, layout=_COL))

  def save_checkpoint(n, state):
    """The state at the start of group n // g; W1, W2 from their bf16 operand copies when the
    checkpoints are bf16."""
    W1, b1, W2, b2 = state
    k = lax.div(n, g)
    plgpu.wait_smem_to_gmem(0)  # the stage buffers are free again
    st_b1[...], st_b2[...] = b1, b2
    if not bf16_weights:
      st_w1[...], st_w2[...] = W1, W2
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(w1b_s if bf16_weights else st_w1, ck_w1.at[i, h, k, :, hid])
    plgpu.copy_smem_to_gmem(st_b1, ck_b1.at[i, h, k, 0, hid])
    plgpu.copy_smem_to_gmem(w2b_s if bf16_weights else st_w2, ck_w2.at[i, h, k, hid, :])

    @pl.when(c == 0)
    def _():
      plgpu.copy_smem_to_gmem(st_b2, ck_b2.at[i, h, k, 0])

  def step(n, state):
    W1, b1, W2, b2 = state
    if bf16_weights:
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last checkpoint left w1b_s, w2b_s
    stage((w1b_s, W1), (w2b_s, W2))

    @pl.when(lax.rem(n, g) == 0)
    def _():
      save_checkpoint(n, state)

    slot = lax.rem(n, 2)
    plgpu.barrier_wait(load_bar.at[slot])
    bufs = types.SimpleNamespace(
        xq=xq_2.at[slot], xk=xk_2.at[slot], xv=xv_2.at[slot], w1=w1b_s, w2=w2b_s, x2=x2_s,
        x2_bar=x2bar_s, eg1=eg1_s, eg2=eg2_s, g2=g2_s, neg_b=attn_s, neg_a=attn_s)

    @pl.when(n + 1 < num_mini_batches)
    def _():  # the other buffer's last readers (mini-batch n - 1) have finished
      prefetch(n + 1)

    eta = plgpu.load(eta_2.at[slot], layout=_ROW)  # [b]
    cluster_sum = lambda part, k: cl.sum((k, part, _WGMMA))[0]
    r = mini_batch(bufs, eta, b1, b2, gamma, beta, eps, cluster_sum)
    x_hat, _ = _normalize(r.Z2_bar, eps)
    bd = (b, d)
    XQ = plgpu.load(bufs.xq, layout=_WGMMA).astype(jnp.float32)
    out = XQ + _cols(gamma, bd) * x_hat + _cols(beta, bd)

    @pl.when(c == 0)
    def _():
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      out_s[...] = out.astype(out_s.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_s, out_g.at[i, h, n])

    # The update (gradient step at the mini-batch's last token).
    W1 = W1 - _matmul((d, fp), (bufs.xk.transpose((1, 0)), eg1_s))
    W2 = W2 - _matmul((fp, d), (x2_s.transpose((1, 0)), eg2_s))
    cl.sync()  # every peer has read this step's partials
    return W1, b1 - r.db1, W2, b2 - r.db2

  prefetch(0)
  lax.fori_loop(0, num_mini_batches, step, state)
  plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("eps", "checkpoint_group", "cluster", "interpret",
                                             "debug", "per_example_init", "weights_dtype"))
def forward(xq, xk, xv, eta, ln_weight, ln_bias, init, *, eps: float, checkpoint_group: int,
            cluster: int = 4, interpret=False, debug: bool = False,
            per_example_init: bool = False, weights_dtype=jnp.float32):
  """TTT-MLP forward; arguments and results as `gpu.forward` (kind="ttt_mlp").

  xq, xk, xv: [B, H, N, 64, d] bf16; eta: [B, H, N, 64]; ln_weight, ln_bias: [H, d]; init:
  (W1 [H, d, 4d], b1 [H, 1, 4d], W2 [H, 4d, d], b2 [H, 1, d]), each [B, H, ...] with
  per_example_init (the backward's recompute from checkpoints). `cluster`: CTAs per head.
  `weights_dtype`: of the W1 and W2 checkpoints (b1, b2 stay f32); bf16 for the backward's
  stack of states (`gpu_cluster_backward`), which are exactly the operands the kernel's
  matmuls used.
  `interpret`: False, or a `plgpu.InterpretGPUParams` to run on the CPU; `debug`: print the
  kernel's jaxpr and lowered code.
  """
  B, H, N, b, d = xq.shape
  f = 4 * d
  if not supports("ttt_mlp", xq.dtype, b, d, cluster):
    raise ValueError(f"gpu_cluster.forward: b={b}, d={d}, dtype {xq.dtype}, cluster={cluster} "
                     "is not supported (see gpu_cluster.supports: bf16, b = 64, d = 64 with "
                     "cluster = 4); use gpu.forward.")
  fp, G = f // cluster, num_groups(N, checkpoint_group)
  f32 = jnp.float32
  state_types = (((d, f), weights_dtype), ((1, f), f32), ((f, d), weights_dtype), ((1, d), f32))
  out_type = (jax.ShapeDtypeStruct(xq.shape, xq.dtype),
              *(jax.ShapeDtypeStruct((B, H, G, *s), t) for s, t in state_types),
              jax.ShapeDtypeStruct((B, H, cluster, 2, b, d) if interpret else (1,), f32))
  scratch = _scratch(b, d, cluster, xq.dtype, bool(interpret))
  def ttt_mlp_forward_cluster(*refs):  # the kernel's name in the lowered module
    _kernel(*refs[:16], refs[16:], eps=eps, g=checkpoint_group, num_mini_batches=N,
            cluster=cluster, interpret=bool(interpret), per_example_init=per_example_init)

  kernel = plgpu.kernel(
      ttt_mlp_forward_cluster, out_type=out_type, scratch_types=scratch, grid=(B, H), grid_names=("batch", "heads"),
      cluster=(cluster,), cluster_names=("cluster",), interpret=interpret or None,
      debug=debug)
  out, *ckpts, _ = kernel(xq, xk, xv, eta.astype(f32), ln_weight.astype(f32),
                          ln_bias.astype(f32), *(w.astype(f32) for w in init))
  return out, tuple(ckpts)
