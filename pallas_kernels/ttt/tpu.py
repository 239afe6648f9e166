"""TTT forward and backward as Mosaic TPU Pallas kernels (interpret mode on CPU).

One kernel pair for both inner models (`kind`: "ttt_mlp", state W1, b1, W2, b2; "ttt_linear",
state W1, b1): the mini-batch math is `tile.step(kind, ...)`. Sizes below are TTT-MLP's.

Forward, grid (B, H / hb, ceil(N / k)) with the mini-batch axis 'arbitrary' (sequential) and
the others 'parallel' (split over a megacore's TensorCores). The state of the grid step's hb
heads lives in VMEM scratch (f32: 168 KiB per head at d = 64, tiles padded) for the whole
sweep: it is loaded from the initial weights at the first step and never goes back to HBM
except as a checkpoint at the start of every group of g mini-batches ([B, H, ceil(N/g), ...],
what the backward recomputes from). A grid step runs k consecutive mini-batches
(`BlockSizes.mini_batches_per_step`: 8 by default, 16 in the table's TPU entries) in a loop:
one mini-batch of one head at d = 64 is about 20 MFLOP, 0.09 us at a v5p TensorCore's MXU peak
and 589 bundles (0.34 us) as libtpu schedules it (`benchmarks/tpu_schedule.py`), against the
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
transposes, eta turned into the column that math takes by `_eta_tile`), 5-30% fewer
bundles there (the table's comment); at d <= 64 "db" wins. The hb heads of a step run a
mini-batch loop each, or with `BlockSizes.interleave_heads` (the table's pick at d <= 64) one
loop runs them side by side, hb independent chains of dependent matmuls and vector work for the
scheduler to interleave: 2-12% fewer bundles at d <= 64 on v5p, v5e and v6e (d = 64, b = 64 on a
v5p: 618.5 -> 589), 1-8% more at d = 128 ("bd" tiles). The backward keeps a loop per head:
interleaved the same way (a state stack per head), its bundles a mini-batch moved by -5% to +8%
over d <= 64 on a v5p (its reverse loop already spills). The matmuls take operands of the
inputs' dtype (`tile.mlp_update`'s `operands`: bf16 inputs make bf16 operands with f32
accumulation, as the reference's kernel; the state stays f32).

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

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ttt.block_sizes import BlockSizes, vmem_capacity
from pallas_kernels.ttt import tile
from pallas_kernels.ttt.tile import num_groups, pad_to_groups, step, step_vjp, update

_SEMANTICS = ("parallel", "parallel", "arbitrary")
_SCOPED_VMEM_DEFAULT = 16 << 20  # Mosaic's scoped VMEM limit where none is given
# libtpu's VMEM use of the backward over `vmem_estimate`: 0.95 (v5p, d = 128, b = 64) to 1.13
# (v4, d = 128, b = 64; 1.06-1.10 at the other d = 128 shapes there), compile-only.
_VMEM_HEADROOM = 1.25


def _vmem_bytes(shape, itemsize: int = 4) -> int:
  """Bytes of an array in VMEM: its last two axes padded to whole (8, 128) tiles."""
  *lead, r, c = shape
  return math.prod(lead) * -(-r // 8) * 8 * -(-c // 128) * 128 * itemsize


def vmem_estimate(hb: int, g: int, b: int, d: int, in_bytes: int = 4,
                  kind: str = "ttt_mlp", layout: str = "db") -> int:
  """Bytes of VMEM the backward kernel needs (the forward needs less): the (g + 1)-state stack,
  the double-buffered input/output blocks (xq, xk, xv, ct_out, their cotangents: [g, *tile];
  eta and its cotangent: [g, b]), the resident state and LayerNorm cotangents, the checkpoint
  and gamma, beta in; f32 state as the kernels hold it (`state_shapes`), every tile padded to
  (8, 128)."""
  state = sum(_vmem_bytes(s) for s in state_shapes(kind, d, b, layout))
  blocks = 2 * hb * (7 * _vmem_bytes((g, *_tile(layout, b, d)), in_bytes)
                     + 2 * _vmem_bytes((g, b)))
  ln = 2 * _vmem_bytes(_tile(layout, b, d))
  return (g + 1) * state + blocks + 4 * hb * (state + ln)  # double-buffered: in and out


def _tile(layout: str, b: int, d: int) -> tuple[int, int]:
  """A mini-batch's d-wide tile in `layout`: [d, b] in "db", [b, d] in "bd"."""
  return (d, b) if layout == "db" else (b, d)


def _token_axis(layout: str) -> int:
  """The tokens' axis of a tile in `layout`."""
  return -1 if layout == "db" else -2


def _to_tiles(x, layout: str):
  """[..., b, d] mini-batches as the kernels' tiles in `layout`, or back (in "db" a transpose,
  which under jit XLA can fold into the layouts of the producer and the consumer)."""
  return jnp.swapaxes(x, -1, -2) if layout == "db" else x


def state_shapes(kind: str, d: int, b: int, layout: str = "db") -> tuple[tuple[int, int], ...]:
  """Per-head shapes of the state as the kernels hold it (scratch, checkpoints, state
  cotangents): `tile.state_shapes` in `layout`, the bias added to the features (the state's
  last array: TTT-MLP's b2, TTT-Linear's b1) broadcast along the tokens, a [d, b] or [b, d]
  tile, as gamma and beta. In VMEM and HBM a [d, 1] column takes the (8, 128) tiles of
  [d, 128] anyway, so at b <= 128 this costs nothing in "db"."""
  return (*tile.state_shapes(kind, d, layout)[:-1], _tile(layout, b, d))


def _broadcast_tokens(w, b: int, layout: str):
  """w, whose tokens' axis (`_token_axis`) has size 1, broadcast to b tokens."""
  shape = list(w.shape)
  shape[_token_axis(layout)] = b
  return jnp.broadcast_to(w, shape)


def _to_kernel(kind: str, state, b: int, layout: str):
  """A state [..., *tile.state_shapes(kind, d)] as the kernels hold it (`state_shapes`)."""
  *rest, bias = tile.to_layout(kind, state, layout)
  return (*rest, _broadcast_tokens(bias, b, layout))


def _from_kernel(kind: str, state, reduce, layout: str):
  """Back from the kernels' form, the feature bias's tokens reduced by `reduce(w, axis)`."""
  bias = reduce(state[-1], _token_axis(layout))
  return tile.to_layout(kind, (*state[:-1], bias), layout)


def checkpoint_states(kind: str, checkpoints, layout: str = "db"):
  """`forward`'s checkpoints as `tile.state_shapes(kind, d)` arrays [B, H, G, ...] (the
  bias's tokens are equal: the first)."""
  first = lambda w, axis: jax.lax.slice_in_dim(w, 0, 1, axis=axis % w.ndim)
  return _from_kernel(kind, checkpoints, first, layout)


def _ln_tiles(ln_weight, ln_bias, b: int, layout: str):
  """The inner LayerNorm's gamma and beta [H, d] as [H, *tile] tiles, broadcast along the
  tokens: loaded whole inside the loops, where a [d, 1] column is broadcast across the lanes
  at each use (forward 643.5 -> 627.5 bundles a mini-batch on a v5p; b2 likewise: -> 620.5)."""
  return (_broadcast_tokens(jnp.expand_dims(w, _token_axis(layout)), b, layout)
          for w in (ln_weight, ln_bias))


def _eta_tile(v, layout: str):
  """One mini-batch's eta [1, b] (a row, as the kernels read it) as `layout`'s math takes it, or
  that math's cotangent back to the row: "bd" takes a column, [b, 1]."""
  return v if layout == "db" else _transpose_vector(v)


def _transpose_vector(v):
  """[1, n] <-> [n, 1] without a transpose (Mosaic TPU lays out a [1, n] row in one sublane and
  an [n, 1] column across sublanes): v broadcast to [n, n], masked to the diagonal and summed
  along v's own axis, from lane or sublane reductions only."""
  n, axis = max(v.shape), v.shape.index(1) ^ 1
  eye = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0) == jax.lax.broadcasted_iota(
      jnp.int32, (n, n), 1)
  return jnp.sum(jnp.where(eye, jnp.broadcast_to(v, (n, n)), 0), axis=axis, keepdims=True)


def fit_vmem(sizes: BlockSizes, device_kind: str, *, kind: str, heads_per_step: int, g: int,
             b: int, d: int, in_bytes: int) -> BlockSizes:
  """`sizes` with a scoped VMEM limit the backward's step fits in, or a ValueError naming the
  fix where the device's VMEM cannot hold it.

  The need is `vmem_estimate` with `_VMEM_HEADROOM`; it becomes the limit (at least the table's
  `vmem_limit_bytes`, at most the device's VMEM: `block_sizes.vmem_capacity`) where it passes
  Mosaic's default scoped limit, which the backward outgrows at d = 128 and g = 16 (libtpu,
  v5p, no limit: "Scoped allocation with size 18.67M and limit 16.00M"). Devices whose VMEM
  is unknown (interpret mode on the CPU, new chips) get the need without the check.
  """
  layout = sizes.tpu_layout
  need = int(_VMEM_HEADROOM * vmem_estimate(heads_per_step, g, b, d, in_bytes, kind, layout))
  capacity = vmem_capacity(device_kind)
  if capacity and need > capacity:
    fits = lambda hb, k: (_VMEM_HEADROOM * vmem_estimate(hb, k, b, d, in_bytes, kind, layout)
                          <= capacity)
    largest_g = max((k for k in range(1, g) if fits(heads_per_step, k)), default=0)
    fix = (f"lower checkpoint_group to {largest_g} or less (model.ttt.checkpoint_group)"
           if largest_g else "use impl='xla' for this shape")
    if heads_per_step > 1 and fits(1, g):
      fix = f"use BlockSizes(heads_per_step=1) (block_sizes=...), or {fix}"
    raise ValueError(
        f"the TPU backward at head_dim={d}, mini_batch={b}, checkpoint_group={g}, "
        f"heads_per_step={heads_per_step} ({in_bytes}-byte inputs) needs about {need / 2**20:.1f} "
        f"MiB of VMEM (tpu.vmem_estimate x {_VMEM_HEADROOM}), more than the {device_kind}'s "
        f"{capacity / 2**20:.0f} MiB: {fix}.")
  limit = max(sizes.vmem_limit_bytes or 0, -(-need // 2**20) * 2**20)
  if sizes.vmem_limit_bytes is None and limit <= _SCOPED_VMEM_DEFAULT:
    return sizes
  return dataclasses.replace(sizes, vmem_limit_bytes=min(limit, capacity or limit))


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
    eta = _eta_tile(eta_ref[h, pl.ds(jax.lax.rem(n0, E) + t, 1), :], layout)
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
  at the start of each group of g, in the form `backward` takes: `checkpoint_states` reads
  them).

  The kernel's tiles are `block_sizes.tpu_layout`'s (`_to_tiles`).
  """
  B, H, N, b, d = xq.shape
  dtype, hb, g = init[0].dtype, heads_per_step, checkpoint_group
  layout = block_sizes.tpu_layout
  G = num_groups(N, g)
  k = mini_batches_per_step(block_sizes.mini_batches_per_step, g)
  E = max(8, k)
  shapes = state_shapes(kind, d, b, layout)
  xq, xk, xv = (_to_tiles(x, layout) for x in (xq, xk, xv))  # [B, H, N, *tile]

  x_spec = pl.BlockSpec((None, hb, k, *_tile(layout, b, d)), lambda i, j, s: (i, j, s, 0, 0))
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
      in_specs=[x_spec] * 3 + [eta_spec] + [per_head(_tile(layout, b, d))] * 2
      + [per_head(s) for s in shapes],
      out_specs=(x_spec, tuple(ckpt_spec(s) for s in shapes)),
      out_shape=(jax.ShapeDtypeStruct(xq.shape, xq.dtype),
                 tuple(jax.ShapeDtypeStruct((B, H, G, *s), dtype) for s in shapes)),
      scratch_shapes=[pltpu.VMEM((hb, *s), dtype) for s in shapes],
      compiler_params=_params(block_sizes),
      interpret=interpret,
      debug=debug,
      name=f"{kind}_forward_tpu",
  )(xq, xk, xv, eta, *_ln_tiles(ln_weight, ln_bias, b, layout),
    *_to_kernel(kind, init, b, layout))
  return _to_tiles(out, layout), checkpoints


# ----------------------------------------------------------------------------- backward


def _backward_kernel(xq_ref, xk_ref, xv_ref, eta_ref, gamma_ref, beta_ref, *refs, kind, eps, hb,
                     g, layout):
  """Refs (tiles in `layout`, here "db"): x [hb, g, d, b] (group G-1-k), eta [hb, g, b] (rows),
  gamma/beta [hb, d, b] (`_ln_tiles`), the group's checkpoint [hb, ...], ct_out [hb, g, d, b];
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
      return (*(r[h, t].astype(dtype) for r in (xq_ref, xk_ref, xv_ref)), _eta_tile(eta, layout))

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
      dx_refs[3][h, pl.ds(t, 1), :] = _eta_tile(ct_x[3], layout)  # d eta [1, b]
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
  shapes, tile_shape = state_shapes(kind, d, b, layout), _tile(layout, b, d)
  eta_dtype = eta.dtype
  xq, xk, xv, ct_out = (_to_tiles(pad_to_groups(x, G, g), layout)  # [B, H, G g, *tile]
                        for x in (xq, xk, xv, ct_out))
  eta = pad_to_groups(eta.astype(dtype), G, g).reshape(B, H, G, g, b)  # rows, as the forward

  rev = lambda i, j, k: (i, j, G - 1 - k, 0, 0)
  x_spec = pl.BlockSpec((None, hb, g, *tile_shape), rev)
  eta_spec = pl.BlockSpec((None, hb, None, g, b), rev)
  per_head = pl.BlockSpec((hb, *tile_shape), lambda i, j, k: (j, 0, 0))
  ckpt_spec = lambda s: pl.BlockSpec((None, hb, None, *s), rev)
  resident = lambda s: pl.BlockSpec((None, hb, *s), lambda i, j, k: (i, j, 0, 0))

  outs = pl.pallas_call(
      functools.partial(_backward_kernel, kind=kind, eps=eps, hb=hb, g=g, layout=layout),
      grid=(B, H // hb, G),
      in_specs=[x_spec] * 3 + [eta_spec, per_head, per_head] + [ckpt_spec(s) for s in shapes]
      + [x_spec],
      out_specs=[x_spec] * 3 + [eta_spec, resident(tile_shape), resident(tile_shape)]
      + [resident(s) for s in shapes],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (xq, xk, xv, eta)]
      + [jax.ShapeDtypeStruct((B, H, *tile_shape), dtype)] * 2
      + [jax.ShapeDtypeStruct((B, H, *s), dtype) for s in shapes],
      scratch_shapes=[pltpu.VMEM((g + 1, *s), dtype) for s in shapes],
      compiler_params=_params(block_sizes),
      interpret=interpret,
      debug=debug,
      name=f"{kind}_backward_tpu",
  )(xq, xk, xv, eta, *_ln_tiles(ln_weight, ln_bias, b, layout), *checkpoints, ct_out)
  ct_xs = tuple(_to_tiles(o[:, :, :N], layout) for o in outs[:3])
  ct_eta = outs[3].reshape(B, H, G * g, b)[:, :, :N].astype(eta_dtype)
  tokens = _token_axis(layout)
  return (*ct_xs, ct_eta, outs[4].sum(tokens), outs[5].sum(tokens),
          _from_kernel(kind, outs[6:], lambda w, axis: w.sum(axis, keepdims=True), layout))
