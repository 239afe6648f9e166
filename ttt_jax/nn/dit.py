"""The CogVideoX-TTT diffusion transformer (spec 2): embeddings, scanned layers, final layer.

  video [B, T, C, H, W], text [B, n, L, text_dim], t [B]  ->  v-prediction [B, T, C, H, W]

The token layout (n segments of L text tokens, T frames of P = H/p * W/p tokens) is read off
the input shapes, so one set of parameters serves every duration of the curriculum. The N
layers are one stacked `DiTBlock` (`nnx.vmap` at init) applied with `jax.lax.scan` under the
remat policy `model.remat_policy`: compile time does not grow with depth. Parameter names
follow upstream's `dit.*` modules (spec 1.5); `ttt_jax.checkpoint` maps them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ttt_jax import config as config_lib
from ttt_jax.nn.seq_block import SeqModelingBlock
from ttt_jax.sequence import SequenceLayout
from ttt_jax.sharding import constrain

_normal = nnx.initializers.normal(0.02)


def timestep_embedding(t, dim: int):
  """[cos | sin] of t * 10000^(-k / (dim/2)), float32 (spec 2.2). t: [B] raw DDPM index."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)  # [B, dim]


def _dense(din, dout, dtype, param_dtype, rngs):
  return nnx.Linear(din, dout, kernel_init=_normal, dtype=dtype, param_dtype=param_dtype,
                    rngs=rngs)


def _norm(dim, eps, dtype, param_dtype, rngs):
  return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)


class MLP(nnx.Module):
  def __init__(self, dim: int, dtype, param_dtype, rngs: nnx.Rngs):
    self.layer1 = _dense(dim, 4 * dim, dtype, param_dtype, rngs)
    self.layer2 = _dense(4 * dim, dim, dtype, param_dtype, rngs)

  def __call__(self, x):
    return self.layer2(jax.nn.gelu(self.layer1(x), approximate=True))


class DiTBlock(nnx.Module):
  """One transformer layer (spec 2.6): adaLN -> sequence block -> gate; adaLN -> MLP -> gate."""

  def __init__(self, m, *, dtype, param_dtype, rngs: nnx.Rngs):
    D, E, eps = m.model_dim, m.time_embed_dim, m.layer_norm_eps
    t = m.ttt
    self.pre_seq_adaLN_modulation = _dense(E, 6 * D, dtype, param_dtype, rngs)
    self.pre_seq_layernorm = _norm(D, eps, dtype, param_dtype, rngs)
    self.seq_modeling_block = SeqModelingBlock(
        D, m.num_heads, variant=m.variant, attn_length=m.attn_length,
        prefix_temporal_length=m.prefix_temporal_length, rope_theta=m.rope_theta, eps=eps,
        attention_backend=m.attention_backend, gating_alpha_init=t.gating_alpha_init,
        ttt_kwargs=dict(mini_batch_size=t.mini_batch_size, base_lr=t.base_lr,
                        checkpoint_group=t.checkpoint_group, inner_eps=t.inner_eps,
                        rope_theta=t.rope_theta, eta_layout=t.eta_layout, impl=t.impl),
        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.pre_mlp_adaLN_modulation = _dense(E, 6 * D, dtype, param_dtype, rngs)
    self.pre_mlp_layernorm = _norm(D, eps, dtype, param_dtype, rngs)
    self.mlp = MLP(D, dtype, param_dtype, rngs)

  def __call__(self, x_video, x_text, t_emb, layout: SequenceLayout):
    act = jax.nn.silu(t_emb)[:, None, :]  # [B, 1, E], broadcast over tokens
    # Chunk order shift, scale, gate for video, then for text (diffusers' LayerNormZero).
    sv, cv, gv, st, ct, gt = jnp.split(self.pre_seq_adaLN_modulation(act), 6, axis=-1)
    u_v = self.pre_seq_layernorm(x_video) * (1 + cv) + sv
    u_t = self.pre_seq_layernorm(x_text) * (1 + ct) + st
    s_v, s_t = self.seq_modeling_block(u_v, u_t, layout)
    x_video, x_text = x_video + gv * s_v, x_text + gt * s_t

    sv, cv, gv, st, ct, gt = jnp.split(self.pre_mlp_adaLN_modulation(act), 6, axis=-1)
    # Norm and MLP inputs by token ("length"); with the default rules (mlp -> tensor too) the
    # MLP's columns are split over the same axis, see ttt_jax.sharding. Uneven token counts
    # are padded by XLA.
    seq = lambda x: constrain(x, ("batch", "length", None))
    w_v = seq(self.pre_mlp_layernorm(seq(x_video)) * (1 + cv) + sv)
    w_t = seq(self.pre_mlp_layernorm(seq(x_text)) * (1 + ct) + st)
    return x_video + gv * self.mlp(w_v), x_text + gt * self.mlp(w_t)


class PatchEmbedding(nnx.Module):
  """2x2 patches of each latent frame (as upstream's conv, flattened in (c, p, q) order) and
  the text projection."""

  def __init__(self, m, *, dtype, param_dtype, rngs):
    p = m.patch_size
    self.patch_size = p
    self.vid_proj = _dense(m.in_channels * p * p, m.model_dim, dtype, param_dtype, rngs)
    self.text_proj = _dense(m.text_dim, m.model_dim, dtype, param_dtype, rngs)

  def __call__(self, video, text):
    B, T, C, Hl, Wl = video.shape
    p = self.patch_size
    patches = video.reshape(B, T, C, Hl // p, p, Wl // p, p).transpose(0, 1, 3, 5, 2, 4, 6)
    x_video = self.vid_proj(patches.reshape(B, T * (Hl // p) * (Wl // p), C * p * p))
    x_text = self.text_proj(text.reshape(B, -1, text.shape[-1]))  # chunk-major
    return x_video, x_text


class FinalLayer(nnx.Module):
  def __init__(self, m, *, dtype, param_dtype, rngs):
    D, p = m.model_dim, m.patch_size
    self.adaLN_modulation = _dense(m.time_embed_dim, 2 * D, dtype, param_dtype, rngs)
    self.norm = _norm(D, m.layer_norm_eps, dtype, param_dtype, rngs)
    self.linear = _dense(D, p * p * m.in_channels, dtype, param_dtype, rngs)

  def __call__(self, x, t_emb):
    shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(t_emb))[:, None], 2, axis=-1)
    return self.linear(self.norm(x) * (1 + scale) + shift)


class DiT(nnx.Module):
  """CogVideoX-TTT: `DiT(config.model, rngs=...)(video, text, timesteps)`."""

  def __init__(self, m, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    dtype = jnp.dtype(m.dtype)
    self.config = ml_collections.FrozenConfigDict(m)  # hashable: a static part of the pytree
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.patch_embedding = PatchEmbedding(m, rngs=rngs, **kw)
    self.time_embed_0 = _dense(m.model_dim, m.time_embed_dim, rngs=rngs, **kw)
    self.time_embed_2 = _dense(m.time_embed_dim, m.time_embed_dim, rngs=rngs, **kw)

    @nnx.split_rngs(splits=m.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked_layers(rngs):
      return DiTBlock(m, rngs=rngs, **kw)

    self.layers = stacked_layers(rngs)  # every parameter gains a leading [num_layers] axis
    self.transformer_norm = _norm(m.model_dim, m.layer_norm_eps, rngs=rngs, **kw)
    self.final_layer = FinalLayer(m, rngs=rngs, **kw)

  @classmethod
  def from_config(cls, config, *, rngs: nnx.Rngs) -> "DiT":
    config_lib.validate(config)
    return cls(config.model, rngs=rngs)

  def layout(self, video_shape, text_shape) -> SequenceLayout:
    """The token layout of inputs of these shapes; errors name the mismatching argument."""
    m = self.config
    if len(video_shape) != 5 or video_shape[2] != m.in_channels:
      raise ValueError(f"video must be [B, T, C={m.in_channels}, H, W] latents, got shape "
                       f"{tuple(video_shape)}.")
    if len(text_shape) != 4 or text_shape[-1] != m.text_dim or text_shape[0] != video_shape[0]:
      raise ValueError(f"text must be [B={video_shape[0]}, n, L, text_dim={m.text_dim}] "
                       f"embeddings, got shape {tuple(text_shape)}.")
    _, T, _, Hl, Wl = video_shape
    if Hl % m.patch_size or Wl % m.patch_size:
      raise ValueError(f"video height/width {Hl}x{Wl} must be divisible by "
                       f"patch_size={m.patch_size}.")
    return SequenceLayout(num_chunks=text_shape[1], text_length=text_shape[2], num_frames=T,
                          grid_h=Hl // m.patch_size, grid_w=Wl // m.patch_size)

  def __call__(self, video, text, timesteps):
    """video [B, T, C, H, W], text [B, n, L, text_dim], timesteps [B] -> [B, T, C, H, W]."""
    layout = self.layout(video.shape, text.shape)
    m = self.config
    x_video, x_text = self.patch_embedding(video.astype(self.dtype), text.astype(self.dtype))
    t_emb = timestep_embedding(timesteps, m.model_dim).astype(self.dtype)
    t_emb = self.time_embed_2(jax.nn.silu(self.time_embed_0(t_emb)))  # [B, E]

    graphdef, state = nnx.split(self.layers)

    def layer(carry, layer_state):
      x_video, x_text = nnx.merge(graphdef, layer_state)(*carry, t_emb, layout)
      # The residual stream between layers: batch-sharded, replicated over tensor.
      return tuple(constrain(x, ("batch", None, None)) for x in (x_video, x_text)), None

    policy = config_lib.REMAT_POLICIES[m.remat_policy]
    if m.remat_policy != "none":
      layer = jax.checkpoint(layer, policy=policy)
    carry = (x_video, x_text)
    if m.scan_layers:
      carry, _ = jax.lax.scan(layer, carry, state)
    else:  # unrolled: for debugging and for checking the scan
      for i in range(m.num_layers):
        carry, _ = layer(carry, jax.tree.map(lambda a: a[i], state))
    x_video = self.transformer_norm(carry[0])

    y = self.final_layer(x_video, t_emb)  # [B, T*h*w, C*p*p], channel k = c*p*p + i*p + j
    B, T, C, Hl, Wl = video.shape
    p = m.patch_size
    y = y.reshape(B, T, Hl // p, Wl // p, C, p, p).transpose(0, 1, 4, 2, 5, 3, 6)
    return y.reshape(B, T, C, Hl, Wl).astype(jnp.float32)
