"""The T5 v1.1 encoder (spec 5) in Flax nnx, and its loader from Hugging Face safetensors.

  T5Encoder(config, dtype=..., rngs=...)(input_ids [B, L]) -> final hidden states [B, L, d_model]

The architecture of `transformers.T5EncoderModel` with `feed_forward_proj="gated-gelu"`:
token embedding; per layer RMS norm -> self-attention (no biases, no 1/sqrt(d) scaling) with a
relative position bias, residual; RMS norm -> gated-GELU feed-forward, residual; final RMS norm.
The bias table lives in the first layer upstream and is shared by all layers, so here it is a
top-level parameter and the [H, L, L] bias is computed once before the `lax.scan` over the
stacked layers. Called without an attention mask, as CogVideoX calls it (pads attend).
`load_hf` reads `encoder.*` / `shared.weight` safetensors (one file or a sharded folder).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.checkpoint.tensor_files import CheckpointError, open_tensors


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The encoder hyper-parameters (names as in HF's config.json)."""
  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6

  @classmethod
  def xxl(cls) -> "T5Config":
    """google/t5-v1_1-xxl (CogVideoX's text encoder)."""
    return cls(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)

  @classmethod
  def from_hf_config(cls, hf: Mapping) -> "T5Config":
    """From a transformers T5Config dict (config.json); only gated-GELU (v1.1) is supported."""
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in ("gated-gelu", "gated-gelu_new"):
      raise CheckpointError(f"T5 feed_forward_proj={proj!r}: only the v1.1 'gated-gelu' encoder "
                            "(gelu_new, tanh approximation) is implemented.")
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names[:6] if n not in hf]
    if missing:
      raise CheckpointError(f"T5 config lacks {missing}.")
    return cls(**{n: hf[n] for n in names if n in hf})


def relative_position_bucket(relative_position, *, num_buckets: int, max_distance: int,
                             bidirectional: bool = True) -> np.ndarray:
  """T5's bucket of memory_position - query_position (HF `_relative_position_bucket`), in NumPy.

  Buckets depend only on the (static) length, so they are computed on the host at trace time;
  the log is taken in float32 as torch does, so boundary cases round the same way.
  """
  rel = np.asarray(relative_position, np.int64)
  buckets = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets += (rel > 0) * num_buckets
    rel = np.abs(rel)
  else:
    rel = -np.minimum(rel, 0)
  max_exact = num_buckets // 2
  is_small = rel < max_exact
  with np.errstate(divide="ignore"):  # log(0) where is_small picks the exact bucket anyway
    scaled = (np.log(rel.astype(np.float32) / np.float32(max_exact)) /
              np.float32(math.log(max_distance / max_exact)) *
              np.float32(num_buckets - max_exact))
  large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)  # truncation, as .to(long)
  large = np.minimum(large, num_buckets - 1)
  return buckets + np.where(is_small, rel, large)


def _dense(din, dout, std, dtype, param_dtype, rngs):
  # T5's own init scales (no 1/sqrt(d) in attention: it is folded into the query init).
  return nnx.Linear(din, dout, use_bias=False, kernel_init=nnx.initializers.normal(std),
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class RMSNorm(nnx.Module):
  """T5LayerNorm: x / sqrt(mean(x^2) + eps) * weight; no mean, no bias, statistics in float32."""

  def __init__(self, dim: int, eps: float, dtype, param_dtype):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps, self.dtype = eps, dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # Upstream casts to the weight dtype before scaling (bf16 T5 scales in bf16).
    return self.weight[...].astype(self.dtype) * y.astype(self.dtype)


class SelfAttention(nnx.Module):
  def __init__(self, c: T5Config, dtype, param_dtype, rngs):
    inner, kw = c.num_heads * c.d_kv, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = _dense(c.d_model, inner, (c.d_model * c.d_kv) ** -0.5, **kw)
    self.k = _dense(c.d_model, inner, c.d_model ** -0.5, **kw)
    self.v = _dense(c.d_model, inner, c.d_model ** -0.5, **kw)
    self.o = _dense(inner, c.d_model, inner ** -0.5, **kw)
    self.num_heads, self.d_kv, self.dtype = c.num_heads, c.d_kv, dtype

  def __call__(self, x, bias):
    """x [B, L, D], bias [H, L, L] float32 -> [B, L, D]."""
    B, L, _ = x.shape
    split = lambda t: t.reshape(B, L, self.num_heads, self.d_kv)  # [B, L, H, d]
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores + bias[None], axis=-1).astype(self.dtype)  # [B, H, L, L]
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return self.o(out.reshape(B, L, self.num_heads * self.d_kv))


class GatedGeluFF(nnx.Module):
  """wo(gelu_tanh(wi_0 x) * wi_1 x)."""

  def __init__(self, c: T5Config, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.wi_0 = _dense(c.d_model, c.d_ff, c.d_model ** -0.5, **kw)
    self.wi_1 = _dense(c.d_model, c.d_ff, c.d_model ** -0.5, **kw)
    self.wo = _dense(c.d_ff, c.d_model, c.d_ff ** -0.5, **kw)

  def __call__(self, x):
    return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class T5Block(nnx.Module):
  """One encoder layer: x + attn(norm(x), bias); then x + ff(norm(x))."""

  def __init__(self, c: T5Config, dtype, param_dtype, rngs):
    self.attn_norm = RMSNorm(c.d_model, c.layer_norm_epsilon, dtype, param_dtype)
    self.attn = SelfAttention(c, dtype, param_dtype, rngs)
    self.ff_norm = RMSNorm(c.d_model, c.layer_norm_epsilon, dtype, param_dtype)
    self.ff = GatedGeluFF(c, dtype, param_dtype, rngs)

  def __call__(self, x, bias):
    x = x + self.attn(self.attn_norm(x), bias)
    return x + self.ff(self.ff_norm(x))


class T5Encoder(nnx.Module):
  """`T5Encoder(config, dtype=jnp.bfloat16, rngs=...)(input_ids [B, L]) -> [B, L, d_model]`."""

  def __init__(self, config: T5Config, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    c, dtype = config, jnp.dtype(dtype)
    self.config, self.dtype = c, dtype
    self.shared = nnx.Embed(c.vocab_size, c.d_model, dtype=dtype, param_dtype=param_dtype,
                            embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
    self.relative_attention_bias = nnx.Param(nnx.initializers.normal(c.d_model ** -0.5)(
        rngs.params(), (c.relative_attention_num_buckets, c.num_heads), param_dtype))

    @nnx.split_rngs(splits=c.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked_layers(rngs):
      return T5Block(c, dtype, param_dtype, rngs)

    self.layers = stacked_layers(rngs)  # every parameter gains a leading [num_layers] axis
    self.final_layer_norm = RMSNorm(c.d_model, c.layer_norm_epsilon, dtype, param_dtype)

  def position_bias(self, length: int):
    """[H, L, L] float32 bias of key position k for query position q (bidirectional)."""
    c = self.config
    pos = np.arange(length)
    buckets = relative_position_bucket(
        pos[None, :] - pos[:, None], num_buckets=c.relative_attention_num_buckets,
        max_distance=c.relative_attention_max_distance)  # [L, L], static
    # Upstream adds the bias in the weight dtype, then softmaxes in float32.
    table = self.relative_attention_bias[...].astype(self.dtype).astype(jnp.float32)
    return jnp.take(table, jnp.asarray(buckets, jnp.int32), axis=0).transpose(2, 0, 1)

  def __call__(self, input_ids):
    """input_ids [B, L] int -> final hidden states [B, L, d_model] in the compute dtype."""
    bias = self.position_bias(input_ids.shape[1])  # [H, L, L], shared by every layer
    x = self.shared(input_ids)  # [B, L, D]
    graphdef, state = nnx.split(self.layers)

    def layer(x, layer_state):
      return nnx.merge(graphdef, layer_state)(x, bias), None

    x, _ = jax.lax.scan(layer, x, state)
    return self.final_layer_norm(x)


# --------------------------------------------------------------------------------- loading

_LAYER = "encoder.block.{i}.layer."
# HF name (per layer) -> our path under `layers`, and whether it is a Linear ([out, in]).
_LAYER_NAMES = {
    "0.SelfAttention.q.weight": (("attn", "q", "kernel"), True),
    "0.SelfAttention.k.weight": (("attn", "k", "kernel"), True),
    "0.SelfAttention.v.weight": (("attn", "v", "kernel"), True),
    "0.SelfAttention.o.weight": (("attn", "o", "kernel"), True),
    "0.layer_norm.weight": (("attn_norm", "weight"), False),
    "1.DenseReluDense.wi_0.weight": (("ff", "wi_0", "kernel"), True),
    "1.DenseReluDense.wi_1.weight": (("ff", "wi_1", "kernel"), True),
    "1.DenseReluDense.wo.weight": (("ff", "wo", "kernel"), True),
    "1.layer_norm.weight": (("ff_norm", "weight"), False),
}
_EMBED_NAMES = ("shared.weight", "encoder.embed_tokens.weight")  # tied: either may be stored
_BIAS_NAME = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def _read_config(path) -> T5Config:
  folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  file = os.path.join(folder, "config.json")
  if not os.path.isfile(file):
    raise CheckpointError(f"{path}: no config.json beside the weights; pass config=T5Config(...).")
  with open(file) as f:
    return T5Config.from_hf_config(json.load(f))


def load_hf(path, config: T5Config | None = None, *, dtype=jnp.bfloat16,
            param_dtype=None) -> T5Encoder:
  """A T5Encoder with the weights of an HF T5 (encoder) safetensors file or folder.

  `config` defaults to the folder's config.json. Parameters are stored in `param_dtype`
  (default: `dtype`, as the reference casts T5 to bf16). Every tensor is checked for presence
  and shape before any is read; one CheckpointError lists all problems. The full embedding
  (32128 rows for XXL) is kept: the scene tokens use the checkpoint's rows 32100/32101.
  """
  path = os.fspath(path)
  c = config or _read_config(path)
  param_dtype = jnp.dtype(param_dtype or dtype)
  L, H, D, inner = c.num_layers, c.num_heads, c.d_model, c.num_heads * c.d_kv
  linear_shapes = {"q": (inner, D), "k": (inner, D), "v": (inner, D), "o": (D, inner),
                   "wi_0": (c.d_ff, D), "wi_1": (c.d_ff, D), "wo": (D, c.d_ff)}
  with open_tensors(path) as src:
    embed_name = next((n for n in _EMBED_NAMES if n in src), _EMBED_NAMES[0])
    want = {embed_name: (c.vocab_size, D), _BIAS_NAME: (c.relative_attention_num_buckets, H),
            "encoder.final_layer_norm.weight": (D,)}
    for i in range(L):
      for suffix, (ours, linear) in _LAYER_NAMES.items():
        want[_LAYER.format(i=i) + suffix] = linear_shapes[ours[1]] if linear else (D,)
    problems = [f"missing {n} {list(s)}" if n not in src else
                f"{n} has shape {list(src[n].shape)}, expected {list(s)}"
                for n, s in want.items() if n not in src or src[n].shape != s]
    problems += [f"{n} has non-float dtype {src[n].dtype}" for n in want
                 if n in src and src[n].dtype.kind not in "fV"]
    if problems:
      raise CheckpointError(f"{path}: not a T5 v1.1 encoder for {c}:\n  " + "\n  ".join(problems))

    load = lambda name, linear=False: (lambda a: a.T if linear else a)(
        src[name].load().astype(param_dtype))
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: T5Encoder(c, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))))
    params = nnx.to_pure_dict(abstract)
    params["shared"]["embedding"] = jnp.asarray(load(embed_name))
    params["relative_attention_bias"] = jnp.asarray(load(_BIAS_NAME))
    params["final_layer_norm"]["weight"] = jnp.asarray(load("encoder.final_layer_norm.weight"))
    for suffix, (ours, linear) in _LAYER_NAMES.items():
      leaf = params["layers"]
      for key in ours[:-1]:
        leaf = leaf[key]
      stacked = np.empty(leaf[ours[-1]].shape, param_dtype)  # [num_layers, ...]
      for i in range(L):  # one layer's tensor in host memory at a time, besides the stack
        stacked[i] = load(_LAYER.format(i=i) + suffix, linear)
      leaf[ours[-1]] = jnp.asarray(stacked)
  nnx.replace_by_pure_dict(abstract, params)
  return nnx.merge(graphdef, abstract)
