"""The public Pallas TTT ops, `ttt_mlp` and `ttt_linear`: kernels under a `jax.custom_vjp`.

Two kernel families (`backend`): "tpu" (Mosaic TPU, `tpu.py`) and "gpu" (Triton, `gpu.py`,
with TTT-MLP's bf16 forward and backward as Mosaic GPU cluster kernels, `gpu_cluster.py` and
`gpu_cluster_backward.py`, where the block sizes ask for it), each a forward and a backward.
Both forwards save the state at the start of every group of `checkpoint_group` mini-batches;
both backwards recompute one group at a time from its checkpoint (the TPU kernel in VMEM, the
GPU one into HBM by the forward kernel) and run it in reverse, so the backward holds one
group's states at a time, as the pure op's remat does. At checkpoint_group = 1 the GPU cluster
kernels skip the recompute: the forward saves every state as the backward reads it (bf16
weights) and one backward call sweeps them all (`gpu.stores_states`). The forward alone (not
differentiated) saves one checkpoint, whatever the group.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.ttt import gpu, tpu, tpu_layout
from pallas_kernels.ttt.block_sizes import BlockSizes, get_block_sizes
from pallas_kernels.ttt.tile import state_shapes
from ttt_jax import sharding
from ttt_jax.ops.ttt import check_shapes

BACKENDS = ("tpu", "gpu")


@dataclasses.dataclass(frozen=True)
class _Config:
  kind: str  # "ttt_mlp" | "ttt_linear"
  eps: float
  checkpoint_group: int
  backend: str
  heads_per_step: int
  interpret: Any  # False, True, or pltpu.InterpretParams for the TPU kernels
  debug: bool
  block_sizes: BlockSizes


def default_backend() -> str:
  """The kernel family for the platform being compiled for (`sharding.target_platform`):
  "gpu" on GPU, else "tpu" (on CPU interpreted: its kernels cover the backward too)."""
  return "gpu" if sharding.target_platform() == "gpu" else "tpu"


def ttt_mlp(xq, xk, xv, eta, ln_weight, ln_bias, W1, b1, W2, b2, *, eps: float = 1e-6,
            checkpoint_group: int | None = 16, backend: str | None = None, interpret=None,
            debug: bool = False, block_sizes: BlockSizes | None = None):
  """TTT-MLP over a sequence of mini-batches: `ttt_jax.ops.ttt_mlp` as Pallas kernels.

  Args:
    xq, xk, xv: [B, H, N, b, d]; eta: [B, H, N, b]; ln_weight, ln_bias: [H, d];
      W1 [H, d, 4d], b1 [H, 1, 4d], W2 [H, 4d, d], b2 [H, 1, d]: as in `ttt_jax.ops.ttt_mlp`.
    eps: inner LayerNorm epsilon.
    checkpoint_group: the forward saves the state every this many mini-batches and the
      backward recomputes one group at a time (None or 0: one group, the whole sequence).
      At 1 on the GPU cluster kernels, the forward saves every state as the backward reads
      it and the backward recomputes nothing (`gpu.stores_states`: less compute, the most
      memory).
    backend: "tpu" (Mosaic TPU kernels) or "gpu" (Triton; the Mosaic GPU cluster kernels
      where `block_sizes.cluster` asks for them and the shape allows). None: the
      platform being compiled for (`ttt_jax.sharding.target_device`); on CPU "tpu", whose
      kernels cover the backward.
    interpret: run the kernels in Pallas interpret mode: True, or `pltpu.InterpretParams()`
      (TPU kernels only: also checks races and out-of-bounds reads, ~30x slower). None:
      interpret when compiling for CPU.
    debug: print the kernels' jaxprs and lowered code (`pallas_call(debug=True)`).
    block_sizes: override the tuning table (`block_sizes.get_block_sizes`).

  Returns:
    [B, H, N, b, d] outputs in the dtype of xq; the state is float32 (float64 for float64
    inputs) whatever the input dtype.
  """
  return _call("ttt_mlp", xq, xk, xv, eta, ln_weight, ln_bias, (W1, b1, W2, b2), eps=eps,
               checkpoint_group=checkpoint_group, backend=backend, interpret=interpret,
               debug=debug, block_sizes=block_sizes)


def ttt_linear(xq, xk, xv, eta, ln_weight, ln_bias, W1, b1, *, eps: float = 1e-6,
               checkpoint_group: int | None = 16, backend: str | None = None, interpret=None,
               debug: bool = False, block_sizes: BlockSizes | None = None):
  """TTT-Linear over a sequence of mini-batches: `ttt_jax.ops.ttt_linear` as Pallas kernels;
  W1: [H, d, d], b1: [H, 1, d], the rest as `ttt_mlp`."""
  return _call("ttt_linear", xq, xk, xv, eta, ln_weight, ln_bias, (W1, b1), eps=eps,
               checkpoint_group=checkpoint_group, backend=backend, interpret=interpret,
               debug=debug, block_sizes=block_sizes)


def _call(kind, xq, xk, xv, eta, ln_weight, ln_bias, init, *, eps, checkpoint_group, backend,
          interpret, debug, block_sizes):
  H, N, d = xq.shape[1], xq.shape[2], xq.shape[-1]
  names = ("W1", "b1", "W2", "b2")
  check_shapes(xq, xk, xv, eta, ln_weight, ln_bias,
               {n: (w, (H, *s)) for n, w, s in zip(names, init, state_shapes(kind, d))})
  platform, device_kind = sharding.target_device()
  backend = backend or default_backend()
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}: use one of {BACKENDS} (or None: the platform).")
  if interpret is None:
    interpret = platform == "cpu"
  if not interpret and platform != backend:
    raise ValueError(f"backend={backend!r} kernels do not compile for {platform!r}: use "
                     f"interpret=True, the platform's backend, or the pure op ttt_jax.ops.{kind} "
                     "(impl='xla').")
  if backend == "gpu" and not isinstance(interpret, bool):
    raise ValueError("interpret: the GPU (Triton) kernel takes True or False, not "
                     f"{interpret!r}.")
  g = min(checkpoint_group, N) if checkpoint_group and checkpoint_group > 0 else N
  sizes = block_sizes or get_block_sizes(device_kind, xq.dtype, d)
  hb = tpu.heads_per_step(sizes.heads_per_step, H)
  if backend == "tpu":
    sizes = tpu_layout.fit_vmem(sizes, device_kind, kind=kind, heads_per_step=hb, g=g,
                                b=xq.shape[3], d=d, in_bytes=xq.dtype.itemsize)
  cfg = _Config(kind, float(eps), g, backend, hb, interpret, bool(debug), sizes)
  return _ttt(cfg, xq, xk, xv, eta, ln_weight, ln_bias, tuple(init))


def _state_dtype(xq):
  return jnp.promote_types(xq.dtype, jnp.float32)  # f32 state; f64 stays f64


def _forward(cfg: _Config, xq, xk, xv, eta, ln_weight, ln_bias, init):
  dtype = _state_dtype(xq)
  state = tuple(w.astype(dtype) for w in init)
  kw = dict(kind=cfg.kind, eps=cfg.eps, checkpoint_group=cfg.checkpoint_group,
            interpret=cfg.interpret, debug=cfg.debug, block_sizes=cfg.block_sizes)
  if cfg.backend == "tpu":
    return tpu.forward(xq, xk, xv, eta, ln_weight, ln_bias, state,
                       heads_per_step=cfg.heads_per_step, **kw)
  return gpu.forward(xq, xk, xv, eta, ln_weight, ln_bias, state, **kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ttt(cfg, xq, xk, xv, eta, ln_weight, ln_bias, init):
  if cfg.backend == "gpu":  # not differentiated: one checkpoint to write, not N / g
    cfg = dataclasses.replace(cfg, checkpoint_group=xq.shape[2])
  return _forward(cfg, xq, xk, xv, eta, ln_weight, ln_bias, init)[0]


def _fwd(cfg, xq, xk, xv, eta, ln_weight, ln_bias, init):
  out, checkpoints = _forward(cfg, xq, xk, xv, eta, ln_weight, ln_bias, init)
  # The initial weights are kept (they are small, [H, ...]) for their dtypes.
  return out, (xq, xk, xv, eta, ln_weight, ln_bias, init, checkpoints)


def _bwd(cfg, residuals, ct_out):
  xq, xk, xv, eta, ln_weight, ln_bias, init, checkpoints = residuals
  dtype = _state_dtype(xq)
  kw = dict(kind=cfg.kind, eps=cfg.eps, checkpoint_group=cfg.checkpoint_group,
            interpret=cfg.interpret, debug=cfg.debug, block_sizes=cfg.block_sizes)
  if cfg.backend == "tpu":
    kw["heads_per_step"] = cfg.heads_per_step
  backward = tpu.backward if cfg.backend == "tpu" else gpu.backward
  ct_q, ct_k, ct_v, ct_eta, ct_gamma, ct_beta, ct_state = backward(
      xq, xk, xv, eta, ln_weight.astype(dtype), ln_bias.astype(dtype), checkpoints, ct_out, **kw)
  # The LayerNorm parameters and the initial state are shared by the batch: sum over it.
  return (ct_q, ct_k, ct_v, ct_eta, ct_gamma.sum(0).astype(ln_weight.dtype),
          ct_beta.sum(0).astype(ln_bias.dtype),
          tuple(c.sum(0).astype(w.dtype) for c, w in zip(ct_state, init)))


_ttt.defvjp(_fwd, _bwd)
