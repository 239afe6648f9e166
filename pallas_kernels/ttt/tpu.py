"""TTT forward and backward as Mosaic TPU Pallas kernels (interpret mode on CPU).

One kernel pair for both inner models (`kind`: "ttt_mlp", state W1, b1, W2, b2; "ttt_linear",
state W1, b1): the mini-batch math is `tile.step(kind, ...)`; how the kernels hold tiles and
state, and the VMEM that takes, is `tpu_layout.py`. Sizes below are TTT-MLP's.

Forward, grid (B, H / hb, ceil(N / k)) with the mini-batch axis 'arbitrary' (sequential) and
the others 'parallel' (split over a megacore's TensorCores). The state of the grid step's hb
heads lives in VMEM scratch (f32: 168 KiB per head at d = 64, tiles padded) for the whole
sweep: it is loaded from the initial weights at the first step and never goes back to HBM
except as a checkpoint at the start of every group of g mini-batches ([B, H, ceil(N/g), ...],
what the backward recomputes from). A grid step runs k consecutive mini-batches
(`BlockSizes.mini_batches_per_step`: 8 by default, 16 in the table's TPU entries) in a loop:
one mini-batch of one head at d = 64 is about 20 MFLOP, 0.09 us at a v5p TensorCore's MXU peak
and 582 bundles (0.33 us) as libtpu schedules it (`benchmarks/tpu_schedule.py`), against the
~0.35 us a Pallas TPU grid step costs, so one mini-batch per step would spend about half the
time on step overhead.
Mini-batches n0 .. n0 + k - 1 of XQ, XK, XV are one BlockSpec block, so Pallas double-buffers
them: the DMA of the next k overlaps the math. The kernels' tiles are [d, b], a feature a row
(`BlockSizes.tpu_layout` "db", `tile.LAYOUTS`): the inner LayerNorms' statistics are then sums
over sublanes, where over [b, d] tiles they were cross-lane reductions, 56 a mini-batch through
the XLU with VMEM round trips, and two stretches of ~150 bundles without MXU work (837 -> 620.5
bundles a forward mini-batch on a v5p, bf16; the backward's recompute 564 -> 410.5, its reverse
2,079 -> 1,534.5; 1,340 with gelu's closed-form JVPs). The wrappers transpose XQ, XK, XV, the
output (and the cotangents) and W2 (held [d, f]); under jit XLA can fold the transposes into the
producers' layouts. gamma, beta and the bias added to the features (b2) are held broadcast along
the tokens, [d, b] tiles, as a [d, 1] column would be broadcast across the lanes at each use
(`state_shapes`). eta comes as rows, max(8, k) mini-batches to a block (whole (8, 128) tiles,
where a [b, 1] column per mini-batch would pad each token to 128 lanes in HBM and VMEM): the row
is what the "db" math takes. At d = 128 the tuning table picks [b, d] tiles ("bd": no
transposes, eta turned into the column that math takes by `eta_tile`), 5-30% fewer
bundles there (the table's comment); at d <= 64 "db" wins. The hb heads of a step run a
mini-batch loop each, or with `BlockSizes.interleave_heads` (the table's pick at d <= 64) one
loop runs them side by side, hb independent chains of dependent matmuls and vector work for the
scheduler to interleave: at two heads 2-12% fewer bundles at d <= 64 on v5p, v5e and v6e
(d = 64, b = 64 on a v5p: 618.5 -> 589; 582 at the table's 3 heads), 1-8% more at d = 128
("bd" tiles). The backward keeps a loop per head: interleaved the same way (a state stack per
head), its bundles a mini-batch moved by -5% to +8% over d <= 64 on a v5p (its reverse loop
already spills); and with each head's recompute in one loop beside the previous head's reverse,
by -9% to +8% over the shape grid on v5p, v5e and v6e (-2.6% at d = b = 64 on a v5p). With each
mini-batch's output VJP in the recompute loop (a stack of its state cotangents, the reverse
loop left with the update's), +3.1%, +8.8%, -4% at d = 64, 32, 16 (b = 64, v5p): not kept. Not
kept in the forward either: passing XK and XQ as [b, d] rows too (Z1's and the output's
products then skip the XLU transposes of their left operands) took the XLU from 0.165 ops a
bundle to 0.068 and the bundles by only -2.2%, -1.1%, +1.6% at d = 64, 32, 16 (b = 64, v5p):
the XLU does not bound the loop. The matmuls take operands of the inputs' dtype
(`tile.mlp_update`'s `operands`: bf16 inputs make bf16 operands with f32 accumulation, as the
reference's kernel; the state stays f32).

Backward, grid (B, H / hb, G) with the group axis 'arbitrary' and walked last group first. Each
step recomputes its group's states from the saved one (`tile.update`: no outputs), keeping the
g + 1 states it passes through in a VMEM stack [g + 1, ...] (about 2.8 MiB per head at g = 16,
d = 64), then runs the g mini-batches in reverse with `tile.step_vjp`, which takes the state
after mini-batch t from the stack (t + 1) instead of stepping state t again. The cotangent of
the state flows from group to group in the resident output blocks of dW1, db1, dW2, db2 (their
block index does not depend on the group), read and written each mini-batch rather than
carried as loop values (it would not fit the vector registers, as the forward's state), and the
gradients of the LayerNorm parameters accumulate the same way. Stored state is O(N / g) per
(batch, head), as in the pure op's remat; the sequence is padded to G * g mini-batches with
eta = 0 and a zero output cotangent, which leaves the state and its cotangent unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ttt.block_sizes import BlockSizes
from pallas_kernels.ttt.tile import num_groups, pad_to_groups, step, step_vjp, update
from pallas_kernels.ttt.tpu_layout import (eta_tile, from_kernel, ln_tiles, state_shapes,
                                           tile_shape, to_kernel, to_tiles, token_axis)

_SEMANTICS = ("parallel", "parallel", "arbitrary")


def _params(block_sizes: BlockSizes):
  return pltpu.CompilerParams(dimension_semantics=_SEMANTICS,
                              vmem_limit_bytes=block_sizes.vmem_limit_bytes)


# ----------------------------------------------------------------------------- forward


def heads_per_step(requested: int, H: int) -> int:
  """Heads per grid step: the largest divisor of H up to `requested`."""
  return max(k for k in range(1, min(requested, H) + 1) if H % k == 0)


def mini_batches_per_step(requested: int, g: int) -> int:
  """Mini-batches per forward grid step: the largest k <= requested that divides g (so a
  checkpoint group starts only at a step's first mini-batch) and divides 8 or is a multiple
  of 8 (so a step's eta rows lie in one block of max(8, k) rows)."""
  return max(k for k in range(1, max(1, min(requested, g)) + 1)
             if g % k == 0 and (8 % k == 0 or k % 8 == 0))


def _forward_kernel(xq_ref, xk_ref, xv_ref, eta_ref, gamma_ref, beta_ref, *refs, kind, eps, hb,
                    g, k, num_mini_batches, layout, interleave):
  """Refs (tiles in `layout`, here "db"): x [hb, k, d, b] (mini-batches n0 = step * k to
  n0 + k - 1), eta [hb, E, b] (E = max(8, k) mini-batches from n0 - n0 % E, one per row),
  gamma/beta [hb, d, b], initial state [hb, ...]; outputs out [hb, k, d, b] and the
  checkpoint blocks [hb, ...] of group n0 // g; scratch: the running state [hb, ...]. The last
  step's block may run past the sequence: those mini-batches are skipped (their inputs are
  padding, their outputs dropped)."""
  ns = len(refs) // 2 - 1  # refs: ns initial states, out, (ns checkpoints), ns scratch states
  init, out_ref, ckpt_refs, state_refs = refs[:ns], refs[ns], refs[ns + 1], refs[ns + 2:]
  n0 = pl.program_id(2) * k
  E = eta_ref.shape[1]

  @pl.when(n0 == 0)
  def _load():
    for s, w in zip(state_refs, init):
      s[...] = w[...].astype(s.dtype)

  @pl.when(n0 % g == 0)
  def _save():  # the state at the start of group n0 // g
    for c, s in zip(ckpt_refs, state_refs):
      c[...] = s[...]

  dtype = state_refs[0].dtype

  def mini_batch(h, t):  # the state goes through VMEM (too large to carry in vregs)
    gamma, beta = gamma_ref[h].astype(dtype), beta_ref[h].astype(dtype)
    state = tuple(s[h] for s in state_refs)
    xs = [r[h, t].astype(dtype) for r in (xq_ref, xk_ref, xv_ref)]
    eta = eta_tile(eta_ref[h, pl.ds(jax.lax.rem(n0, E) + t, 1), :], layout)
    state, out = step(kind, gamma, beta, eps, state, *xs, eta, operands=xq_ref.dtype,
                      layout=layout)
    for s, w in zip(state_refs, state):
      s[h] = w
    out_ref[h, t] = out.astype(out_ref.dtype)

  # A loop over the k mini-batches for all hb heads side by side, or one for each head.
  for heads in [range(hb)] if interleave else [[h] for h in range(hb)]:
    def body(t, carry, heads=heads):
      @pl.when(n0 + t < num_mini_batches)
      def _():
        for h in heads:
          mini_batch(h, t)
      return carry

    jax.lax.fori_loop(0, k, body, 0)


@functools.partial(jax.jit, static_argnames=("kind", "eps", "checkpoint_group",
                                             "heads_per_step", "interpret", "debug",
                                             "block_sizes"))
def forward(xq, xk, xv, eta, ln_weight, ln_bias, init, *, kind: str, eps: float,
            checkpoint_group: int, heads_per_step: int, interpret=False, debug: bool = False,
            block_sizes: BlockSizes = BlockSizes()):
  """Kernel call. xq, xk, xv: [B, H, N, b, d]; eta: [B, H, N, b]; ln_weight, ln_bias: [H, d];
  init: the initial state [H, ...] of `tile.state_shapes(kind, d)` in the state dtype;
  heads_per_step divides H; `block_sizes.mini_batches_per_step` mini-batches per grid step
  (see `mini_batches_per_step`).

  Returns (out [B, H, N, b, d] in xq's dtype, checkpoints: each state array
  [B, H, ceil(N/g), ...] of `state_shapes(kind, d, b)` in the state dtype, the state
  at the start of each group of g, in the form `backward` takes:
  `tpu_layout.checkpoint_states` reads them).

  The kernel's tiles are `block_sizes.tpu_layout`'s (`to_tiles`).
  """
  B, H, N, b, d = xq.shape
  dtype, hb, g = init[0].dtype, heads_per_step, checkpoint_group
  layout = block_sizes.tpu_layout
  G = num_groups(N, g)
  k = mini_batches_per_step(block_sizes.mini_batches_per_step, g)
  E = max(8, k)
  shapes = state_shapes(kind, d, b, layout)
  xq, xk, xv = (to_tiles(x, layout) for x in (xq, xk, xv))  # [B, H, N, *tile]

  tile_dims = tile_shape(layout, b, d)
  x_spec = pl.BlockSpec((None, hb, k, *tile_dims), lambda i, j, s: (i, j, s, 0, 0))
  # eta as rows, E = max(8, k) mini-batches per block (whole (8, 128) tiles): a [b, 1] column
  # per mini-batch would take 128 lanes per token in HBM and VMEM.
  eta = jnp.pad(eta.astype(dtype), [(0, 0), (0, 0), (0, -N % E), (0, 0)])
  eta = eta.reshape(B, H, -1, E, b)
  eta_spec = pl.BlockSpec((None, hb, None, E, b), lambda i, j, s: (i, j, s * k // E, 0, 0))
  per_head = lambda shape: pl.BlockSpec((hb, *shape), lambda i, j, s: (j, 0, 0))
  ckpt_spec = lambda shape: pl.BlockSpec((None, hb, None, *shape),
                                         lambda i, j, s: (i, j, s * k // g, 0, 0))

  out, checkpoints = pl.pallas_call(
      functools.partial(_forward_kernel, kind=kind, eps=eps, hb=hb, g=g, k=k,
                        num_mini_batches=N, layout=layout,
                        interleave=block_sizes.interleave_heads),
      grid=(B, H // hb, pl.cdiv(N, k)),
      in_specs=[x_spec] * 3 + [eta_spec] + [per_head(tile_dims)] * 2
      + [per_head(s) for s in shapes],
      out_specs=(x_spec, tuple(ckpt_spec(s) for s in shapes)),
      out_shape=(jax.ShapeDtypeStruct(xq.shape, xq.dtype),
                 tuple(jax.ShapeDtypeStruct((B, H, G, *s), dtype) for s in shapes)),
      scratch_shapes=[pltpu.VMEM((hb, *s), dtype) for s in shapes],
      compiler_params=_params(block_sizes),
      interpret=interpret,
      debug=debug,
      name=f"{kind}_forward_tpu",
  )(xq, xk, xv, eta, *ln_tiles(ln_weight, ln_bias, b, layout),
    *to_kernel(kind, init, b, layout))
  return to_tiles(out, layout), checkpoints


# ----------------------------------------------------------------------------- backward


def _backward_kernel(xq_ref, xk_ref, xv_ref, eta_ref, gamma_ref, beta_ref, *refs, kind, eps, hb,
                     g, layout):
  """Refs (tiles in `layout`, here "db"): x [hb, g, d, b] (group G-1-k), eta [hb, g, b] (rows),
  gamma/beta [hb, d, b] (`ln_tiles`), the group's checkpoint [hb, ...], ct_out [hb, g, d, b];
  outputs the input cotangents (blocks like the inputs), d gamma / d beta [hb, d, b] (per token
  position: the wrapper sums them) and the state cotangent [hb, ...] (all three resident: summed
  over mini-batches and groups); scratch: the states [g + 1, ...] of one head before each of
  the group's mini-batches and after its last."""
  k = (len(refs) - 7) // 3  # refs: k checkpoints, ct_out, 4 + 2 + k cotangents, k scratch
  ckpt, ct_ref = refs[:k], refs[k]
  dx_refs, (dgamma, dbeta), dstate = refs[k + 1:k + 5], refs[k + 5:k + 7], refs[k + 7:2 * k + 7]
  stack = refs[2 * k + 7:]
  dtype = stack[0].dtype

  @pl.when(pl.program_id(2) == 0)  # the last group: nothing flows back into it yet
  def _zero():
    for r in (dgamma, dbeta, *dstate):
      r[...] = jnp.zeros(r.shape, r.dtype)

  for h in range(hb):
    ln = lambda h=h: (gamma_ref[h].astype(dtype), beta_ref[h].astype(dtype))  # in the loops

    def inputs(t, h=h):
      eta = eta_ref[h, pl.ds(t, 1), :]  # [1, b]
      return (*(r[h, t].astype(dtype) for r in (xq_ref, xk_ref, xv_ref)), eta_tile(eta, layout))

    for s, c in zip(stack, ckpt):
      s[0] = c[h]

    # The states and their cotangents go through VMEM each mini-batch, as the forward's: as
    # loop values they would not fit the vector registers (spilled to VMEM anyway).
    def recompute(t, carry, ln=ln, inputs=inputs):
      XQ, *rest = inputs(t)
      state = update(kind, *ln(), eps, tuple(s[t] for s in stack), *rest,
                     operands=xq_ref.dtype, layout=layout)
      for s, w in zip(stack, state):
        s[t + 1] = w
      return carry

    jax.lax.fori_loop(0, g, recompute, 0)

    def reverse(i, carry, h=h, ln=ln, inputs=inputs):
      t = g - 1 - i
      state, next_state = (tuple(s[u] for s in stack) for u in (t, t + 1))
      ct_state, *ct_x, ct_g, ct_b = step_vjp(kind, *ln(), eps, state, *inputs(t),
                                             tuple(r[h] for r in dstate),
                                             ct_ref[h, t].astype(dtype),
                                             operands=xq_ref.dtype, next_state=next_state,
                                             layout=layout)
      for r, c in zip(dstate, ct_state):
        r[h] = c
      for r, c in zip(dx_refs[:3], ct_x):
        r[h, t] = c.astype(r.dtype)
      dx_refs[3][h, pl.ds(t, 1), :] = eta_tile(ct_x[3], layout)  # d eta [1, b]
      dgamma[h] += ct_g
      dbeta[h] += ct_b
      return carry

    jax.lax.fori_loop(0, g, reverse, 0)


@functools.partial(jax.jit, static_argnames=("kind", "eps", "checkpoint_group",
                                             "heads_per_step", "interpret", "debug",
                                             "block_sizes"))
def backward(xq, xk, xv, eta, ln_weight, ln_bias, checkpoints, ct_out, *, kind: str, eps: float,
             checkpoint_group: int, heads_per_step: int, interpret=False, debug: bool = False,
             block_sizes: BlockSizes = BlockSizes()):
  """Cotangents of `forward`'s output from its checkpoints.

  xq, xk, xv, ct_out: [B, H, N, b, d]; eta: [B, H, N, b]; ln_weight, ln_bias: [H, d] in the
  state dtype; checkpoints: `forward`'s, each [B, H, G, ...] of `state_shapes(kind, d, b)` in
  the state dtype, G = ceil(N / g) with g = checkpoint_group. Returns the cotangents of (xq, xk,
  xv, eta) in their dtypes, of ln_weight and ln_bias [B, H, d] and of the initial state
  [B, H, ...] (state dtype, `tile.state_shapes(kind, d)`), per batch element (the caller sums
  what the batch shares).
  """
  B, H, N, b, d = xq.shape
  G, g = checkpoints[0].shape[2], checkpoint_group
  dtype, hb, layout = checkpoints[0].dtype, heads_per_step, block_sizes.tpu_layout
  shapes, tile_dims = state_shapes(kind, d, b, layout), tile_shape(layout, b, d)
  eta_dtype = eta.dtype
  xq, xk, xv, ct_out = (to_tiles(pad_to_groups(x, G, g), layout)  # [B, H, G g, *tile]
                        for x in (xq, xk, xv, ct_out))
  eta = pad_to_groups(eta.astype(dtype), G, g).reshape(B, H, G, g, b)  # rows, as the forward

  rev = lambda i, j, k: (i, j, G - 1 - k, 0, 0)
  x_spec = pl.BlockSpec((None, hb, g, *tile_dims), rev)
  eta_spec = pl.BlockSpec((None, hb, None, g, b), rev)
  per_head = pl.BlockSpec((hb, *tile_dims), lambda i, j, k: (j, 0, 0))
  ckpt_spec = lambda s: pl.BlockSpec((None, hb, None, *s), rev)
  resident = lambda s: pl.BlockSpec((None, hb, *s), lambda i, j, k: (i, j, 0, 0))

  outs = pl.pallas_call(
      functools.partial(_backward_kernel, kind=kind, eps=eps, hb=hb, g=g, layout=layout),
      grid=(B, H // hb, G),
      in_specs=[x_spec] * 3 + [eta_spec, per_head, per_head] + [ckpt_spec(s) for s in shapes]
      + [x_spec],
      out_specs=[x_spec] * 3 + [eta_spec, resident(tile_dims), resident(tile_dims)]
      + [resident(s) for s in shapes],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (xq, xk, xv, eta)]
      + [jax.ShapeDtypeStruct((B, H, *tile_dims), dtype)] * 2
      + [jax.ShapeDtypeStruct((B, H, *s), dtype) for s in shapes],
      scratch_shapes=[pltpu.VMEM((g + 1, *s), dtype) for s in shapes],
      compiler_params=_params(block_sizes),
      interpret=interpret,
      debug=debug,
      name=f"{kind}_backward_tpu",
  )(xq, xk, xv, eta, *ln_tiles(ln_weight, ln_bias, b, layout), *checkpoints, ct_out)
  ct_xs = tuple(to_tiles(o[:, :, :N], layout) for o in outs[:3])
  ct_eta = outs[3].reshape(B, H, G * g, b)[:, :, :N].astype(eta_dtype)
  tokens = token_axis(layout)
  return (*ct_xs, ct_eta, outs[4].sum(tokens), outs[5].sum(tokens),
          from_kernel(kind, outs[6:], lambda w, axis: w.sum(axis, keepdims=True), layout))
