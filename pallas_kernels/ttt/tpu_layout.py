"""How the Mosaic TPU kernels (`tpu.py`) hold their data, and the VMEM that takes.

Layout: a mini-batch's d-wide tiles are [d, b], a feature a row ("db", the default) or [b, d]
("bd", the tuning table's pick at d = 128): `BlockSizes.tpu_layout`, `tile.LAYOUTS`. In "db"
the wrappers transpose XQ, XK, XV, the output and the cotangents (`to_tiles`; under jit XLA can
fold the transposes into the producers' and consumers' layouts). The state is held as
`state_shapes`: `tile.state_shapes` in the layout, with the bias added to the features (b2;
TTT-Linear's b1) broadcast along the tokens as gamma and beta are (`ln_tiles`), since a
[d, 1] column would be broadcast across the lanes at each use and takes the (8, 128) tiles of
[d, 128] in VMEM and HBM anyway. eta stays a row in HBM (whole (8, 128) tiles) and `eta_tile`
turns it into the column the "bd" math takes.

VMEM: `vmem_estimate` counts the backward's need (its (g + 1)-state stack dominates), every
tile padded to (8, 128); `fit_vmem` sets Mosaic's scoped VMEM limit from it, or names the fix
where the chip's VMEM (`block_sizes.vmem_capacity`) cannot hold it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pallas_kernels.ttt import tile
from pallas_kernels.ttt.block_sizes import BlockSizes, vmem_capacity


def tile_shape(layout: str, b: int, d: int) -> tuple[int, int]:
  """A mini-batch's d-wide tile in `layout`: [d, b] in "db", [b, d] in "bd"."""
  return (d, b) if layout == "db" else (b, d)


def token_axis(layout: str) -> int:
  """The tokens' axis of a tile in `layout`."""
  return -1 if layout == "db" else -2


def to_tiles(x, layout: str):
  """[..., b, d] mini-batches as the kernels' tiles in `layout`, or back (in "db" a transpose,
  which under jit XLA can fold into the layouts of the producer and the consumer)."""
  return jnp.swapaxes(x, -1, -2) if layout == "db" else x


def state_shapes(kind: str, d: int, b: int, layout: str = "db") -> tuple[tuple[int, int], ...]:
  """Per-head shapes of the state as the kernels hold it (scratch, checkpoints, state
  cotangents): `tile.state_shapes` in `layout`, the bias added to the features (the state's
  last array: TTT-MLP's b2, TTT-Linear's b1) broadcast along the tokens, a [d, b] or [b, d]
  tile, as gamma and beta. In VMEM and HBM a [d, 1] column takes the (8, 128) tiles of
  [d, 128] anyway, so at b <= 128 this costs nothing in "db"."""
  return (*tile.state_shapes(kind, d, layout)[:-1], tile_shape(layout, b, d))


def _broadcast_tokens(w, b: int, layout: str):
  """w, whose tokens' axis (`token_axis`) has size 1, broadcast to b tokens."""
  shape = list(w.shape)
  shape[token_axis(layout)] = b
  return jnp.broadcast_to(w, shape)


def to_kernel(kind: str, state, b: int, layout: str):
  """A state [..., *tile.state_shapes(kind, d)] as the kernels hold it (`state_shapes`)."""
  *rest, bias = tile.to_layout(kind, state, layout)
  return (*rest, _broadcast_tokens(bias, b, layout))


def from_kernel(kind: str, state, reduce, layout: str):
  """Back from the kernels' form, the feature bias's tokens reduced by `reduce(w, axis)`."""
  bias = reduce(state[-1], token_axis(layout))
  return tile.to_layout(kind, (*state[:-1], bias), layout)


def checkpoint_states(kind: str, checkpoints, layout: str = "db"):
  """`forward`'s checkpoints as `tile.state_shapes(kind, d)` arrays [B, H, G, ...] (the
  bias's tokens are equal: the first)."""
  first = lambda w, axis: jax.lax.slice_in_dim(w, 0, 1, axis=axis % w.ndim)
  return from_kernel(kind, checkpoints, first, layout)


def ln_tiles(ln_weight, ln_bias, b: int, layout: str):
  """The inner LayerNorm's gamma and beta [H, d] as [H, *tile] tiles, broadcast along the
  tokens: loaded whole inside the loops, where a [d, 1] column is broadcast across the lanes
  at each use (forward 643.5 -> 627.5 bundles a mini-batch on a v5p; b2 likewise: -> 620.5)."""
  return (_broadcast_tokens(jnp.expand_dims(w, token_axis(layout)), b, layout)
          for w in (ln_weight, ln_bias))


def eta_tile(v, layout: str):
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


# ----------------------------------------------------------------------------- VMEM

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
  blocks = 2 * hb * (7 * _vmem_bytes((g, *tile_shape(layout, b, d)), in_bytes)
                     + 2 * _vmem_bytes((g, b)))
  ln = 2 * _vmem_bytes(tile_shape(layout, b, d))
  return (g + 1) * state + blocks + 4 * hb * (state + ln)  # double-buffered: in and out


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
        f"heads_per_step={heads_per_step} ({in_bytes}-byte inputs) needs about "
        f"{need / 2**20:.1f} MiB of VMEM (tpu_layout.vmem_estimate x {_VMEM_HEADROOM}), more "
        f"than the {device_kind}'s {capacity / 2**20:.0f} MiB: {fix}.")
  limit = max(sizes.vmem_limit_bytes or 0, -(-need // 2**20) * 2**20)
  if sizes.vmem_limit_bytes is None and limit <= _SCOPED_VMEM_DEFAULT:
    return sizes
  return dataclasses.replace(sizes, vmem_limit_bytes=min(limit, capacity or limit))
