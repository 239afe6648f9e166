"""Config helpers: argument parsing for `get_config(arg)`, derived sizes, validation.

The configs themselves are ml-collections `get_config()` files under `configs/`. This module
holds what every config and every entry point shares: the duration table (spec 1.3), the text
length rule, the `SequenceLayout` of a config, and `validate`, which fails early with a message
naming the field and the fix.
"""

from __future__ import annotations

import jax
import ml_collections

from ttt_jax.sequence import SequenceLayout

DURATIONS = (3, 9, 18, 30, 63)  # seconds; one 3 s segment per text chunk
TTT_KINDS = ("ttt_mlp", "ttt_linear")
# The sequence layer of every DiT block: TTT on top of segment-local attention (the paper's
# model), segment-local attention alone, or attention over the whole sequence (no TTT).
VARIANTS = TTT_KINDS + ("local_attention", "full_attention")
ATTENTION_BACKENDS = ("xla", "cudnn", "pallas_tpu")
ETA_LAYOUTS = ("kernel", "aligned")

# Text tokens per segment that upstream's eval configs use at 480x720 (spec 1.3): chosen so
# that n*L + T*1350 is a multiple of 64.
UPSTREAM_TEXT_LENGTH = {3: 498, 9: 502, 18: 471, 30: 497, 63: 458}


# Named remat policies for the scan over DiT layers (`model.remat_policy`): what the backward
# pass keeps from each layer's forward; the rest is recomputed.
REMAT_POLICIES = {
    "none": None,  # no remat: keep everything (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only the layer inputs
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls
    "dots_all": jax.checkpoint_policies.dots_saveable,  # keep every matmul incl. attention
}


class ConfigError(ValueError):
  """A config value is invalid; the message names the field and how to fix it."""


def parse_arg(arg: str | None, **defaults):
  """Parses 'key=value,key=value' (big_vision style) into a ConfigDict over `defaults`.

  Values are converted to the type of the default. Unknown keys raise a ConfigError.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in defaults:
      raise ConfigError(f"Config argument {item!r}: expected key=value with key in "
                        f"{sorted(defaults)}.")
    kind = type(defaults[key])
    try:
      out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    except ValueError as e:
      raise ConfigError(f"Config argument {key}={value!r}: expected a {kind.__name__}.") from e
  return out


def latent_frames(seconds: int) -> int:
  """Latent frames T of a video: 16 fps gives 16s + 1 pixel frames, the VAE compresses 4x."""
  return 4 * seconds + 1


def text_length_for(num_chunks: int, num_video_tokens: int, mini_batch_size: int,
                    min_length: int) -> int:
  """Smallest L >= min_length with (n*L + video tokens) divisible by the mini-batch size."""
  for length in range(min_length, min_length + mini_batch_size):
    if (num_chunks * length + num_video_tokens) % mini_batch_size == 0:
      return length
  raise ConfigError(
      f"No text length L >= {min_length} makes n*L + T*P = {num_chunks}*L + {num_video_tokens} "
      f"a multiple of mini_batch_size={mini_batch_size}; change the latent size or "
      "model.ttt.mini_batch_size.")


def sequence_layout(config) -> SequenceLayout:
  """The token layout of one sample under `config`."""
  m, s = config.model, config.sequence
  return SequenceLayout(num_chunks=s.num_chunks, text_length=s.text_length,
                        num_frames=s.num_frames, grid_h=m.latent_height // m.patch_size,
                        grid_w=m.latent_width // m.patch_size)


def require(ok: bool, field: str, value, fix: str):
  """Raises ConfigError for `config.<field>=value` with `fix` unless `ok`."""
  if not ok:
    raise ConfigError(f"config.{field}={value!r} is invalid: {fix}")


def validate(config) -> None:
  """Raises ConfigError naming the first invalid field of `config`."""
  m, t, s = config.model, config.model.ttt, config.sequence
  require(config.seconds in DURATIONS, "seconds", config.seconds,
           f"use one of {DURATIONS}, given in the config argument "
           "(--config=configs/default.py:seconds=9).")
  for name in ("model_dim", "num_heads", "num_layers", "patch_size", "latent_height",
               "latent_width", "attn_length"):
    require(isinstance(m[name], int) and m[name] > 0, f"model.{name}", m[name],
             "must be a positive integer.")
  require(m.model_dim % m.num_heads == 0, "model.num_heads", m.num_heads,
           f"must divide model.model_dim={m.model_dim}.")
  head_dim = m.model_dim // m.num_heads
  require(head_dim % 16 == 0, "model.model_dim", m.model_dim,
           f"head dim model_dim/num_heads = {head_dim} must be a multiple of 16 (3D RoPE split).")
  for name in ("latent_height", "latent_width"):
    require(m[name] % m.patch_size == 0, f"model.{name}", m[name],
             f"must be divisible by model.patch_size={m.patch_size}.")
  require(m.variant in VARIANTS, "model.variant", m.variant, f"use one of {VARIANTS}.")
  require(m.attention_backend in ATTENTION_BACKENDS, "model.attention_backend",
           m.attention_backend, f"use one of {ATTENTION_BACKENDS}.")
  require(m.remat_policy in REMAT_POLICIES, "model.remat_policy", m.remat_policy,
           f"use one of {sorted(REMAT_POLICIES)}.")
  require(m.dtype in ("float32", "bfloat16"), "model.dtype", m.dtype,
           "use 'float32' or 'bfloat16' (compute dtype; parameters stay float32).")
  require(not (m.attention_backend == "cudnn" and m.dtype != "bfloat16"),
           "model.attention_backend", m.attention_backend,
           f"cuDNN fused attention has no {m.dtype} kernel (config.model.dtype={m.dtype!r}); "
           "use model.dtype=bfloat16 or attention_backend=xla.")
  require(t.eta_layout in ETA_LAYOUTS, "model.ttt.eta_layout", t.eta_layout,
           f"use one of {ETA_LAYOUTS}.")
  require(isinstance(t.mini_batch_size, int) and t.mini_batch_size > 0,
           "model.ttt.mini_batch_size", t.mini_batch_size, "must be a positive integer.")
  require(isinstance(t.checkpoint_group, int) and t.checkpoint_group >= 0,
           "model.ttt.checkpoint_group", t.checkpoint_group,
           "must be an integer >= 0 (0 disables remat).")
  require(t.impl in ("xla", "pallas", "auto"), "model.ttt.impl", t.impl,
           "use 'xla', 'pallas' or 'auto'.")
  require(t.base_lr > 0, "model.ttt.base_lr", t.base_lr, "must be > 0.")
  require(t.inner_eps > 0, "model.ttt.inner_eps", t.inner_eps, "must be > 0.")
  frames = latent_frames(config.seconds)
  require(s.num_frames == frames, "sequence.num_frames", s.num_frames,
           f"{config.seconds} s has {frames} latent frames; set the duration with the config "
           "argument (seconds=...) instead of overriding sequence fields.")
  chunks = frames // m.attn_length
  require(s.num_chunks == chunks, "sequence.num_chunks", s.num_chunks,
           f"{frames} frames in segments of model.attn_length={m.attn_length} give {chunks}.")
  require(isinstance(s.text_length, int) and s.text_length > 0, "sequence.text_length",
           s.text_length, "must be a positive integer.")
  try:
    layout = sequence_layout(config)
    layout.num_mini_batches(t.mini_batch_size)
  except ValueError as e:
    raise ConfigError(f"config.sequence.text_length={s.text_length} / "
                      f"config.model.ttt.mini_batch_size={t.mini_batch_size}: {e}") from e
