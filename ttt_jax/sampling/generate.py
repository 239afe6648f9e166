"""Storyboard -> latents: text encoding, CFG denoiser on the DiT, the jitted sampler loop.

  generate(config, params, graphdef, video, seed=..., text_encoder=...) -> latents [T, C, H, W]

The whole denoising loop is one jitted `lax.scan` (`sampler.sample_loop`): the DiT is compiled
once, and nothing leaves the device between steps. Progress is reported from inside the scan by
an unordered `jax.debug.callback` that ticks a host-side tqdm bar; the alternative (a jitted
single step driven from Python) would cost a dispatch and a host round trip per step and keep
the sampler state outside jit, for no gain in what the bar shows.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax import config as config_lib
from ttt_jax import sharding
from ttt_jax.data.storyboard import TEXT_SEED, TextEmbedder
from ttt_jax.sampling import sampler as sampler_lib
from ttt_jax.sampling.storyboard import Segment, StoryboardError, prompts, seconds_of

CFG_BATCH = 2  # [u; c]: the unconditional and conditional branch share one forward pass


def config_for_duration(config, seconds: int):
  """`config` at another duration: the same model, the sequence sizes of `seconds`.

  The DiT reads its token layout from the input shapes, so only `seconds` and `sequence`
  change; they come from `configs.default.get_config` for the same preset and variant.
  """
  if config.seconds == seconds:
    return config
  from configs import default  # pylint: disable=g-import-not-at-top
  if seconds not in config_lib.DURATIONS:
    raise config_lib.ConfigError(f"seconds={seconds}: use one of {config_lib.DURATIONS}.")
  fresh = default.get_config(f"preset={config.preset},variant={config.model.variant},"
                             f"seconds={seconds}")
  out = config.copy_and_resolve_references()
  with out.unlocked():
    out.seconds = seconds
    out.sequence = fresh.sequence
  config_lib.validate(out)
  return out


def default_text_encoder(config):
  """The tiny presets' word-hash embedder (the stand-in for T5 the data was made with)."""
  if config.preset != "tiny":
    raise ValueError(f"preset={config.preset!r} needs a real text encoder (T5, "
                     "ttt_jax.text); pass text_encoder=.")
  return TextEmbedder(config.model.text_dim, seed=TEXT_SEED)


def encode_texts(texts, text_encoder, length: int) -> np.ndarray:
  """[1, n, L, D] float32 embeddings of n segment texts; too long a text is a StoryboardError."""
  out = []
  for k, text in enumerate(texts):
    try:
      out.append(np.asarray(text_encoder.embed(text, length), np.float32))
    except ValueError as e:
      raise StoryboardError(f"segment {k}: {e}") from e
  return np.stack(out)[None]


@functools.lru_cache(maxsize=None)
def guided_denoiser(graphdef):
  """denoise_fn(operand, x, a_q, t, w) -> D of the DiT `graphdef` with CFG (spec 4.3, 4.5).

  operand = (params, text_u, text_c). One forward pass on the batch [x; x] with texts [u; c]:
  D = a_q x - sqrt(1 - a_q^2) F(x, t), then D = D_u + w (D_c - D_u). Cached per graphdef so
  repeated calls reuse the compiled loop.
  """
  def denoise(operand, x, a_q, t, w):
    params, text_u, text_c = operand
    model = nnx.merge(graphdef, params)
    batch = x.shape[0]
    xx = jnp.concatenate([x, x], axis=0)  # [2B, T, C, H, W]
    text = jnp.concatenate([text_u, text_c], axis=0)  # [2B, n, L, D]
    f = model(xx, text, jnp.full((2 * batch,), t, jnp.float32))  # v-prediction, f32
    d = a_q * xx - jnp.sqrt(1.0 - a_q * a_q) * f
    d_u, d_c = d[:batch], d[batch:]
    return d_u + w * (d_c - d_u)

  return denoise


def check_mesh(mesh, rules):
  """Sampling's CFG batch of 2 must split evenly over the mesh's batch axes."""
  axes, ways = sharding.batch_axes(mesh, rules)
  if CFG_BATCH % ways:
    raise sharding.MeshError(
        f"sampling runs a batch of {CFG_BATCH} (unconditional + conditional) but the batch mesh "
        f"axes {axes} split it {ways} ways; sample with sharding.mesh_shape whose data*fsdp "
        "divides 2, e.g. (1, 1, -1) (tensor parallel) or a single device.")


@functools.lru_cache(maxsize=None)
def sampler_fn(graphdef, mesh, rules, progress: bool):
  """The jitted loop for the DiT `graphdef` (on `mesh` with the logical rules, if given)."""
  loop = functools.partial(sampler_lib.sample_loop, guided_denoiser(graphdef),
                           progress=progress)
  if mesh is None:
    return jax.jit(loop)
  check_mesh(mesh, rules)
  return sharding.jit_sharded(loop, mesh, rules)


def frozen(x):
  """Nested lists (a config read from JSON) -> nested tuples, hashable for the cache."""
  return tuple(frozen(v) for v in x) if isinstance(x, (list, tuple)) else x


def initial_noise(seed: int, shape) -> tuple[jax.Array, jax.Array]:
  """(x_T ~ N(0, I) float32 of `shape`, the key of the per-step normals), from the seed."""
  k_init, k_steps = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k_init, shape, jnp.float32), k_steps


def generate(config, params, graphdef, storyboard_video: list[Segment], *, seed: int,
             num_steps: int = 50, text_encoder=None, sampler: str = "dpmpp_2m_sde",
             cfg_mode: str = "literal", cfg_scale: float = 6.0, cfg_exp: float = 5.0,
             mesh=None, progress: bool | None = None) -> np.ndarray:
  """Samples one storyboard video; returns its latents [T, C, H, W] float32 (numpy).

  The duration follows from the number of segments (3 s each); text_encoder has
  `.embed(text, length) -> [L, D]` (default: the tiny presets' embedder). progress: a tqdm bar
  over the steps (default: when stderr is a terminal).
  """
  config = config_for_duration(config, seconds_of(storyboard_video))
  m, s = config.model, config.sequence
  text_encoder = default_text_encoder(config) if text_encoder is None else text_encoder
  cond, neg = prompts(storyboard_video)
  text_c = encode_texts(cond, text_encoder, s.text_length)  # [1, n, L, D]
  text_u = encode_texts(neg, text_encoder, s.text_length)  # [1, n, L, D]

  tables = sampler_lib.make_tables(sampler, num_steps)
  w = sampler_lib.dynamic_cfg_scales(tables.timesteps, cfg_scale, cfg_exp, cfg_mode)
  shape = (1, s.num_frames, m.in_channels, m.latent_height, m.latent_width)  # [1, T, C, H, W]
  x_T, key = initial_noise(seed, shape)

  progress = sys.stderr.isatty() if progress is None else progress
  rules = frozen(config.sharding.rules) if mesh is not None else None
  fn = sampler_fn(graphdef, mesh, rules, bool(progress))
  operand = (params, jnp.asarray(text_u), jnp.asarray(text_c))
  coeffs = tables.device_coefficients(w)
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    with tqdm(total=num_steps, desc=f"sampling {seconds_of(storyboard_video)} s",
              unit="step") as bar, sampler_lib.progress_to(bar):
      x0 = fn(operand, x_T, key, coeffs)
      x0.block_until_ready()
  else:
    x0 = fn(operand, x_T, key, coeffs)
  return np.asarray(jax.device_get(x0))[0]  # [T, C, H, W]
