"""The sequence-modelling block of a DiT layer (spec 2.7, 3.1-3.2): attention, then TTT.

  X' = attention(text, video)                    segment-local windows, or the whole sequence
  Z  = X' + g_fwd(TTT(X'))                       forward scan
  Z' = Z  + g_bwd(rev(TTT(rev(Z))))              backward scan, same TTT parameters

g multiplies each token feature-wise by tanh(alpha): the text gate on the n*L text tokens, the
video gate on the rest (four gate vectors, spec 1.5). Both scans start from the learned initial
inner state. The variant decides what runs: `ttt_mlp` / `ttt_linear` (all of the above),
`local_attention` (X' only) and `full_attention` (attention over the whole sequence, no TTT).
Names follow upstream's `SeqModelingBlock` (q, k, v, o, q_norm, k_norm, ssm, *_ssm_gating_*).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.config import TTT_KINDS, VARIANTS
from ttt_jax.nn import attention
from ttt_jax.nn.ttt_layer import TTTLayer
from ttt_jax.rope import apply_rope, rope_3d_angles
from ttt_jax.sequence import SequenceLayout
from ttt_jax.sharding import constrain

_normal = nnx.initializers.normal(0.02)


class Gate(nnx.Module):
  """tanh-gate vector of one scan direction and token type (upstream `SSMGating`)."""

  def __init__(self, dim: int, init: float, param_dtype):
    self.gating_alpha = nnx.Param(jnp.full((dim,), init, param_dtype))

  def __call__(self, x):
    return x * jnp.tanh(self.gating_alpha[...].astype(jnp.float32)).astype(x.dtype)


class SeqModelingBlock(nnx.Module):
  """Attention (+ bidirectional TTT) over a sample laid out [all text | all video]."""

  def __init__(self, model_dim: int, num_heads: int, *, variant: str, attn_length: int,
               prefix_temporal_length: int, rope_theta: float, eps: float,
               attention_backend: str, ttt_kwargs: dict, gating_alpha_init: float,
               dtype, param_dtype, rngs: nnx.Rngs):
    if variant not in VARIANTS:
      raise ValueError(f"variant={variant!r}: use one of {VARIANTS}.")
    self.variant, self.num_heads, self.head_dim = variant, num_heads, model_dim // num_heads
    self.attn_length, self.prefix = attn_length, prefix_temporal_length
    self.rope_theta, self.backend, self.dtype = rope_theta, attention_backend, dtype
    D, d = model_dim, self.head_dim
    dense = lambda: nnx.Linear(D, D, kernel_init=_normal, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)
    norm = lambda: nnx.LayerNorm(d, epsilon=eps, use_fast_variance=False, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
    self.q, self.k, self.v, self.o = dense(), dense(), dense(), dense()
    self.q_norm, self.k_norm = norm(), norm()
    if variant in TTT_KINDS:
      self.ssm = TTTLayer(D, num_heads, kind=variant, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs, **ttt_kwargs)
      gate = lambda: Gate(D, gating_alpha_init, param_dtype)
      self.forward_ssm_gating_text, self.forward_ssm_gating_video = gate(), gate()
      self.backward_ssm_gating_text, self.backward_ssm_gating_video = gate(), gate()

  def __call__(self, x_video, x_text, layout: SequenceLayout):
    """x_video [B, T*P, D], x_text [B, n*L, D] -> (video, text) of the same shapes."""
    if self.variant == "full_attention":
      x = jnp.concatenate([x_text, x_video], axis=1)
      y = self._attention(x, layout.seq_text_length, layout.num_frames, layout)
      text, video = y[:, :layout.seq_text_length], y[:, layout.seq_text_length:]
    else:
      windows = attention.segment_windows(x_text, x_video, layout, self.attn_length,
                                          self.prefix)
      y = self._attention(windows, layout.text_length, self.attn_length + self.prefix, layout)
      text, video = attention.merge_windows(y, layout, self.attn_length, self.prefix)
    if self.variant not in TTT_KINDS:
      return video, text

    T0 = layout.seq_text_length
    gated = lambda text_gate, video_gate, z: jnp.concatenate(
        [text_gate(z[:, :T0]), video_gate(z[:, T0:])], axis=1)
    x = jnp.concatenate([text, video], axis=1)
    z = x + gated(self.forward_ssm_gating_text, self.forward_ssm_gating_video,
                  self.ssm(x, layout))
    z = z + gated(self.backward_ssm_gating_text, self.backward_ssm_gating_video,
                  layout.reverse(self.ssm(layout.reverse(z), layout)))
    return z[:, T0:], z[:, :T0]

  def _attention(self, x, num_text: int, num_frames: int, layout: SequenceLayout):
    """Full attention over x [B', num_text + num_frames*P, D] with RoPE on the video part."""
    B, S, D = x.shape
    H, d = self.num_heads, self.head_dim
    x = x.astype(self.dtype)
    heads = lambda t: constrain(t.reshape(B, S, H, d), ("batch", None, "heads", None))
    q = self.q_norm(heads(self.q(x)))
    k = self.k_norm(heads(self.k(x)))
    v = heads(self.v(x))
    # Positions restart at frame 0 in every window (spec 2.8); text is not rotated.
    angles = rope_3d_angles(d, num_frames, layout.grid_h, layout.grid_w, self.rope_theta)
    q, k = (jnp.concatenate([t[:, :num_text], apply_rope(t[:, num_text:], angles)], axis=1)
            for t in (q, k))
    out = attention.dot_product_attention(q, k, v, backend=self.backend)
    return self.o(out.reshape(B, S, D))
