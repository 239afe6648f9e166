"""The TTT layer of the video DiT (spec 3.3-3.5, 3.7): projections around `ttt_jax.ops`.

One call runs one scan direction over a sample laid out [all text | all video]:

  X [B, S, D] -> XQ, XK, XV = X wq, X wk, X wv (with bias)        # [B, S, H, d]
              -> L2-normalise XQ, XK; 3D RoPE on their video tokens (global positions)
              -> XV = LNr(XV - XK) + XK  (reconstruction target, unbiased std, +1e-8)
              -> eta = base_lr * sigmoid(X w_h + c_h) / d / b per key token and head
              -> interleave text and video by scene (n > 1)
              -> ttt_mlp / ttt_linear over mini-batches of b tokens  # [B, H, N, b, d]
              -> merge heads, post_norm, wo, undo the interleave    # [B, S, D]

The bidirectional scan and the tanh gates belong to the DiT block, which calls this layer
twice with shared parameters. Parameter names follow upstream's `TTTBase`/`TTTMLP`, so
checkpoints convert by rename and transpose (`ttt_jax.checkpoint.names`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax import ops
from ttt_jax.config import ETA_LAYOUTS, TTT_KINDS
from ttt_jax.rope import apply_rope, rope_3d_angles
from ttt_jax.sequence import SequenceLayout
from ttt_jax.sharding import constrain

_normal = nnx.initializers.normal(0.02)


class TTTLayer(nnx.Module):
  """TTT-MLP or TTT-Linear sequence layer with its input and output projections."""

  def __init__(self, model_dim: int, num_heads: int, *, kind: str = "ttt_mlp",
               mini_batch_size: int = 64, base_lr: float = 0.1, checkpoint_group: int = 16,
               inner_eps: float = 1e-6, rope_theta: float = 10000.0, eta_layout: str = "kernel",
               impl: str = "xla", dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if kind not in TTT_KINDS:
      raise ValueError(f"kind={kind!r}: use one of {TTT_KINDS}.")
    if eta_layout not in ETA_LAYOUTS:
      raise ValueError(f"eta_layout={eta_layout!r}: use one of {ETA_LAYOUTS}.")
    if model_dim % num_heads:
      raise ValueError(f"num_heads={num_heads} must divide model_dim={model_dim}.")
    self.kind, self.num_heads, self.head_dim = kind, num_heads, model_dim // num_heads
    self.mini_batch_size, self.base_lr, self.checkpoint_group = (
        mini_batch_size, base_lr, checkpoint_group)
    self.inner_eps, self.rope_theta, self.eta_layout = inner_eps, rope_theta, eta_layout
    self.impl = impl
    self.dtype = dtype
    H, d, D = num_heads, self.head_dim, model_dim

    def linear():
      return nnx.Linear(D, D, kernel_init=_normal, dtype=dtype, param_dtype=param_dtype,
                        rngs=rngs)

    def param(init, shape):
      return nnx.Param(init(rngs.params(), shape, param_dtype))

    self.wq, self.wk, self.wv, self.wo = linear(), linear(), linear(), linear()
    self.learnable_ttt_lr_weight = param(_normal, (H, 1, D))
    self.learnable_ttt_lr_bias = param(nnx.initializers.zeros, (H, 1))
    self.ttt_norm_weight = param(nnx.initializers.ones, (H, d))
    self.ttt_norm_bias = param(nnx.initializers.zeros, (H, d))
    f = 4 * d if kind == "ttt_mlp" else d  # hidden width of the inner model
    self.W1 = param(_normal, (H, d, f))
    self.b1 = param(nnx.initializers.zeros, (H, 1, f))
    if kind == "ttt_mlp":
      self.W2 = param(_normal, (H, f, d))
      self.b2 = param(nnx.initializers.zeros, (H, 1, d))
    self.post_norm = nnx.LayerNorm(D, epsilon=1e-6, use_fast_variance=False, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs)

  @classmethod
  def from_config(cls, config, *, dtype=jnp.float32, rngs: nnx.Rngs) -> "TTTLayer":
    m, t = config.model, config.model.ttt
    if m.variant not in TTT_KINDS:
      raise ValueError(f"config.model.variant={m.variant!r} has no TTT layer; use one of "
                       f"{TTT_KINDS}.")
    return cls(m.model_dim, m.num_heads, kind=m.variant, mini_batch_size=t.mini_batch_size,
               base_lr=t.base_lr, checkpoint_group=t.checkpoint_group, inner_eps=t.inner_eps,
               rope_theta=t.rope_theta, eta_layout=t.eta_layout, impl=t.impl, dtype=dtype,
               rngs=rngs)

  def __call__(self, x: jax.Array, layout: SequenceLayout) -> jax.Array:
    """x: [B, S, D] ordered [all text | all video]; returns [B, S, D] in the same order."""
    B, S, D = x.shape
    H, d, b = self.num_heads, self.head_dim, self.mini_batch_size
    if S != layout.total_tokens:
      raise ValueError(f"TTTLayer got {S} tokens but the layout has {layout.total_tokens} "
                       f"(n*L = {layout.seq_text_length} text + {layout.num_video_tokens} video).")
    N = layout.num_mini_batches(b)
    x = x.astype(self.dtype)

    XQ, XK, XV = (proj(x).reshape(B, S, H, d) for proj in (self.wq, self.wk, self.wv))
    XQ, XK = _l2_normalize(XQ), _l2_normalize(XK)
    angles = rope_3d_angles(d, layout.num_frames, layout.grid_h, layout.grid_w, self.rope_theta)
    T0 = layout.seq_text_length
    XQ, XK = (jnp.concatenate([t[:, :T0], apply_rope(t[:, T0:], angles)], axis=1)
              for t in (XQ, XK))
    XV = self._reconstruction_target(XV, XK)

    eta = self._eta(x)  # [B, S, H], pre-interleave token order
    if self.eta_layout == "kernel" and layout.is_multiscene:
      eta = eta.reshape(B, N, b, H)[:, layout.eta_source_mini_batches(b)]  # [B, N, b, H]
    else:
      eta = layout.interleave(eta, axis=1).reshape(B, N, b, H)
    # Heads over the tensor axis: each shard runs the inner loop for its own heads.
    eta = constrain(eta.transpose(0, 3, 1, 2), ("batch", "heads", None, None))  # [B, H, N, b]

    def to_mini_batches(t):  # [B, S, H, d] -> [B, H, N, b, d], interleaved order
      return layout.interleave(t, axis=1).reshape(B, N, b, H, d).transpose(0, 3, 1, 2, 4)

    XQ, XK, XV = (constrain(to_mini_batches(t), ("batch", "heads", None, None, None))
                  for t in (XQ, XK, XV))
    inner = (self.W1, self.b1, self.W2, self.b2) if self.kind == "ttt_mlp" else (self.W1, self.b1)
    op = ops.ttt_mlp if self.kind == "ttt_mlp" else ops.ttt_linear
    out = op(XQ, XK, XV, eta, self.ttt_norm_weight[...], self.ttt_norm_bias[...],
             *(p[...] for p in inner), eps=self.inner_eps,
             checkpoint_group=self.checkpoint_group, impl=self.impl)  # [B, H, N, b, d]

    out = out.transpose(0, 2, 3, 1, 4).reshape(B, S, D)  # heads merged, feature = h*d + j
    out = self.wo(self.post_norm(out))
    return layout.undo_interleave(out, axis=1)

  def _reconstruction_target(self, XV, XK):
    """LNr(XV - XK) + XK with the TTT-norm params, unbiased std, eps added to the std."""
    y = (XV - XK).astype(jnp.float32)
    mu = y.mean(-1, keepdims=True)
    std = jnp.sqrt(jnp.square(y - mu).sum(-1, keepdims=True) / (y.shape[-1] - 1))
    y = self.ttt_norm_weight[...] * ((y - mu) / (std + 1e-8)) + self.ttt_norm_bias[...]
    return (y + XK).astype(XV.dtype)

  def _eta(self, x):
    """Step size of every key token: base_lr * sigmoid(x . w_h + c_h) / d / b. [B, S, H]."""
    w = self.learnable_ttt_lr_weight[...][:, 0, :].astype(jnp.float32)  # [H, D]
    c = self.learnable_ttt_lr_bias[...][:, 0].astype(jnp.float32)  # [H]
    gate = jax.nn.sigmoid(jnp.einsum("bsD,hD->bsh", x.astype(jnp.float32), w) + c)
    return self.base_lr * gate / (self.head_dim * self.mini_batch_size)


def _l2_normalize(x):
  xf = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
  return (xf / jnp.maximum(norm, 1e-12)).astype(x.dtype)
