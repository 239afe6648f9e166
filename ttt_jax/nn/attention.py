"""Attention of the DiT block: segment-local windows (spec 2.7) or the whole sequence.

Segment-local attention runs one full (unmasked) attention per 3 s segment i over

  [text chunk i | latent frames A*i .. A*(i+1)+Q-1]      A = attn_length, Q = prefix frames

with the attention RoPE (spec 2.8) restarted at frame 0 in every window. All windows have the
same length, so they are stacked on the batch axis and run as one attention call. Text rows go
back to their chunk; video rows are summed into the frames they cover and divided by how many
windows cover each frame (the Q overlap frames are the mean of two windows).

`full_attention` (a comparison variant, no TTT) is one window over [all text | all frames]
with global frame positions.

Backends (`model.attention_backend`): "xla" (einsum + float32 softmax, query blocks of
`XLA_QUERY_CHUNK` above that length; any device), "cudnn"
(`jax.nn.dot_product_attention`, GPU, bfloat16 only; sequences padded to a multiple of 64 and
masked by sequence lengths), "pallas_tpu" (splash attention from
`jax.experimental.pallas.ops.tpu`, sequences padded to its block size and masked by segment
ids; interpret mode unless compiling for TPU). Both kernels run per shard under a mesh.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax import sharding
from ttt_jax.sequence import SequenceLayout
from ttt_jax.sharding import constrain

_SPLASH_BLOCK = 128
CUDNN_SEQ_MULTIPLE = 64  # cuDNN fused attention's tile: its backward needs S % 64 == 0
XLA_QUERY_CHUNK = 2048  # queries per step of the chunked XLA path


def dot_product_attention(q, k, v, *, backend: str = "xla"):
  """softmax(q k^T / sqrt(d)) v with no mask. q, k, v: [B, S, H, d] -> [B, S, H, d].

  The kernel backends ("cudnn", "pallas_tpu") are custom calls XLA cannot partition: under a
  mesh (`ttt_jax.sharding.use_rules`) they run per shard in a `shard_map`, windows over the
  batch mesh axes and heads over the heads axis, where the q/k/v constraints put them anyway.
  """
  scale = q.shape[-1] ** -0.5
  if backend == "xla":
    return _xla_attention(q, k, v, scale, XLA_QUERY_CHUNK)
  if backend == "cudnn":
    kernel = functools.partial(padded_attention, scale=scale, implementation="cudnn")
  elif backend == "pallas_tpu":
    kernel = functools.partial(_splash_attention,
                               interpret=sharding.target_platform() != "tpu")
    q = q * jnp.asarray(scale, q.dtype)
  else:
    raise ValueError(f"attention backend {backend!r}: use 'xla', 'cudnn' or 'pallas_tpu'.")
  return sharding.per_shard(kernel, ("batch", None, "heads", None), q, k, v)


def padded_attention(q, k, v, *, scale: float, implementation: str | None = None,
                     multiple: int = CUDNN_SEQ_MULTIPLE):
  """`jax.nn.dot_product_attention` with S padded to a multiple of `multiple`.

  cuDNN's fused attention backward rejects sequence lengths off its tile size (the 18 s and
  30 s windows, 18021 and 18047 tokens); the padded keys are masked out by
  `key_value_seq_lengths` and the padded query rows are cut off.
  """
  B, S = q.shape[:2]
  Sp = -(-S // multiple) * multiple
  if Sp == S:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
  pad = lambda t: jnp.pad(t, ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
  lengths = jnp.full((B,), S, jnp.int32)
  out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), scale=scale,
                                     query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return out[:, :S]


def _xla_attention(q, k, v, scale, chunk: int):
  """Plain XLA attention; above `chunk` queries it runs query blocks in sequence, each
  rematerialised, so logits take [B, H, chunk, S] instead of [B, H, S, S] (at 5B, one 3 s
  window's full logits would be ~62 GB)."""
  def block(qc):  # [B, c, H, d]
    logits = jnp.einsum("bqhd,bkhd->bhqk", qc, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)

  B, S, H, d = q.shape
  if S <= chunk:
    return block(q)
  n = -(-S // chunk)
  qp = jnp.pad(q, ((0, 0), (0, n * chunk - S), (0, 0), (0, 0)))
  qp = qp.reshape(B, n, chunk, H, d).swapaxes(0, 1)  # [n, B, c, H, d]
  out = jax.lax.map(jax.checkpoint(block), qp)
  return out.swapaxes(0, 1).reshape(B, n * chunk, H, d)[:, :S]


def _splash_attention(q, k, v, *, interpret: bool):
  """Splash attention (TPU Pallas) on [B, S, H, d]; pads S to the block size, masks the pad."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  B, S, H, d = q.shape
  Sp = -(-S // _SPLASH_BLOCK) * _SPLASH_BLOCK
  pad = lambda t: jnp.pad(t, ((0, 0), (0, Sp - S), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.FullMask((Sp, Sp))] * H), head_shards=1,
                              q_seq_shards=1, interpret=interpret)
  ids = jnp.asarray(np.arange(Sp) >= S, jnp.int32)  # pad tokens only see each other
  out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(pad(q), pad(k), pad(v),
                                                  sk.SegmentIds(q=ids, kv=ids))  # [B, H, Sp, d]
  return out.transpose(0, 2, 1, 3)[:, :S]


@functools.lru_cache(maxsize=None)
def _window_frames(layout: SequenceLayout, attn_length: int, prefix: int):
  """(first frame, frames per window, per-frame coverage count) of the segment windows."""
  n, T = layout.num_chunks, layout.num_frames
  if n * attn_length + prefix != T:
    raise ValueError(
        f"Segment-local attention needs num_frames = num_chunks * attn_length + "
        f"prefix_temporal_length, got {T} != {n} * {attn_length} + {prefix}; set "
        "model.attn_length / model.prefix_temporal_length to match the duration.")
  starts = tuple(attn_length * i for i in range(n))
  count = np.zeros(T, np.float32)
  for s in starts:
    count[s:s + attn_length + prefix] += 1
  return starts, attn_length + prefix, count


def segment_windows(x_text, x_video, layout: SequenceLayout, attn_length: int, prefix: int):
  """Cuts [B, n*L, D] text and [B, T*P, D] video into windows [B*n, L + W*P, D]."""
  B, _, D = x_text.shape
  n, L, P = layout.num_chunks, layout.text_length, layout.tokens_per_frame
  starts, W, _ = _window_frames(layout, attn_length, prefix)
  # Windows are cut per sample (batch-sharded, whole over tensor): a token-sharded input (the
  # sequence-parallel residual) would otherwise make XLA cut every sample's windows on every
  # device ([B*n, L + W*P, D] for the global batch: 40 GiB at 18 s).
  frames = constrain(x_video.reshape(B, layout.num_frames, P, D), ("batch", None, None, None))
  video = jnp.stack([frames[:, s:s + W] for s in starts], axis=1)  # [B, n, W, P, D]
  text = constrain(x_text.reshape(B, n, L, D), ("batch", None, None, None))
  windows = jnp.concatenate([text, video.reshape(B, n, W * P, D)], axis=2)
  return constrain(windows.reshape(B * n, -1, D), ("batch", None, None))


def merge_windows(y, layout: SequenceLayout, attn_length: int, prefix: int):
  """Inverse of `segment_windows` for outputs: text rows back, video rows averaged."""
  n, L, P, T = layout.num_chunks, layout.text_length, layout.tokens_per_frame, layout.num_frames
  D = y.shape[-1]
  y = constrain(y, ("batch", None, None)).reshape(-1, n, y.shape[1], D)
  B = y.shape[0]
  starts, W, count = _window_frames(layout, attn_length, prefix)
  text = y[:, :, :L].reshape(B, n * L, D)
  video = y[:, :, L:].reshape(B, n, W, P, D).astype(jnp.float32)
  acc = constrain(jnp.zeros((B, T, P, D), jnp.float32), ("batch", None, None, None))
  for i, s in enumerate(starts):
    acc = acc.at[:, s:s + W].add(video[:, i])
  acc = acc / jnp.asarray(count)[None, :, None, None]
  return (constrain(text, ("batch", None, None)),
          constrain(acc.reshape(B, T * P, D).astype(y.dtype), ("batch", None, None)))
