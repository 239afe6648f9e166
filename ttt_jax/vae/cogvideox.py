"""The CogVideoX 3D causal VAE decoder (spec 4.8) in Flax nnx, and its diffusers weight loader.

  decoder = load_hf("CogVideoX-5b/vae")                 # AutoencoderKLCogVideoX folder
  frames = decode(decoder, latents)  # [T, 16, h, w] or [B, T, 16, h, w] -> [B, F, 8h, 8w, 3]

`decode` reproduces diffusers' `AutoencoderKLCogVideoX.decode` (0.42.1, tiling off): the latent
frames are decoded in windows [0, 3), [3, 5), [5, 7), ... (`latent_windows`; the odd leftover
frame joins the first window), one jitted call per window with the causal-conv caches as
explicit inputs and outputs, so GroupNorm statistics are per window exactly as upstream. For an
odd T (every CogVideoX length) F = 1 + 4 (T - 1): 9 frames from the first window, 8 from each
later one. An even T gives 8 per window (4 T frames), as diffusers does. Output is unclamped,
nominally in [-1, 1].

Layout inside: channels last, [B, T, H, W, C]; see `ttt_jax.vae.layers`. The encoder is not
ported. `scaling_factor` is not applied by `decode` unless passed (spec 4.7: ttt-video latents
are unscaled, 1.0; original CogVideoX-5B latents are divided by 0.7).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.checkpoint.tensor_files import CheckpointError, open_tensors
from ttt_jax.vae.layers import Block3D, CausalConv3d, SpatialNorm3D

LATENT_WINDOW = 2  # diffusers' num_latent_frames_batch_size; the VAE was trained on it
SPATIAL_SCALE = 8


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """`AutoencoderKLCogVideoX` hyper-parameters (names as in diffusers' config.json).

  norm_eps is unused by the decoder (its spatial norms hard-code 1e-6, as diffusers).
  """
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 16
  block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
  layers_per_block: int = 3
  act_fn: str = "silu"
  norm_eps: float = 1e-6
  norm_num_groups: int = 32
  temporal_compression_ratio: int = 4
  sample_height: int = 480
  sample_width: int = 720
  scaling_factor: float = 1.15258426
  use_quant_conv: bool = False
  use_post_quant_conv: bool = False

  @classmethod
  def cogvideox_5b(cls) -> "VAEConfig":
    """THUDM/CogVideoX-5b/vae/config.json."""
    return cls(scaling_factor=0.7)

  @classmethod
  def from_hf_config(cls, hf: Mapping) -> "VAEConfig":
    """From a diffusers config dict; other keys (block types, latents mean/std) are checked or
    ignored."""
    problems = []
    if any(t != "CogVideoXUpBlock3D" for t in hf.get("up_block_types", ())):
      problems.append(f"up_block_types {hf['up_block_types']} (only CogVideoXUpBlock3D)")
    if hf.get("act_fn", "silu") not in ("silu", "swish"):
      problems.append(f"act_fn {hf['act_fn']!r} (only silu)")
    if hf.get("use_post_quant_conv"):  # diffusers builds it with out_channels: never used
      problems.append("use_post_quant_conv=True")
    if hf.get("shift_factor") or hf.get("latents_mean") or hf.get("invert_scale_latents"):
      problems.append("shift_factor / latents_mean / invert_scale_latents")
    if problems:
      raise CheckpointError(f"unsupported CogVideoX VAE config: {'; '.join(problems)}.")
    kwargs = {f.name: hf[f.name] for f in dataclasses.fields(cls) if f.name in hf}
    if "block_out_channels" in kwargs:
      kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
    return cls(**kwargs)


class CogVideoXDecoder(nnx.Module):
  """diffusers `CogVideoXDecoder3D`: conv_in, mid block (2 resnets), up blocks (layers_per_block
  + 1 resnets; x2 spatial upsampling but the last; x2 temporal in the first
  log2(temporal_compression_ratio)), spatial norm_out, silu, conv_out. Every norm is conditioned
  on this window's latent.

  `decoder(z [B, t, h, w, C_lat], cache=None) -> (x [B, F, 8h, 8w, C_out], cache)`; the cache is
  the pytree of causal-conv caches for the next window (None: the first window).
  """

  def __init__(self, config: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    c = config
    self.config, self.dtype = c, jnp.dtype(dtype)
    kw = dict(dtype=self.dtype, param_dtype=jnp.dtype(param_dtype), rngs=rngs)
    ch = list(reversed(c.block_out_channels))
    zq, groups = c.latent_channels, c.norm_num_groups
    self.conv_in = CausalConv3d(zq, ch[0], 3, **kw)
    self.mid_block = Block3D(ch[0], ch[0], 2, zq, groups, upsample=False, compress_time=False,
                             **kw)
    time_levels = int(math.log2(c.temporal_compression_ratio))
    self.up_blocks = nnx.List([
        Block3D(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, zq, groups,
                upsample=i < len(ch) - 1, compress_time=i < time_levels, **kw)
        for i in range(len(ch))])
    self.norm_out = SpatialNorm3D(ch[-1], zq, groups, **kw)
    self.conv_out = CausalConv3d(ch[-1], c.out_channels, 3, **kw)

  def __call__(self, z, cache=None):
    cache, new = cache or {}, {}
    z = z.astype(self.dtype)
    x, new["conv_in"] = self.conv_in(z, cache.get("conv_in"))  # [B, t, h, w, C0]
    x, new["mid_block"] = self.mid_block(x, z, cache.get("mid_block"))
    for i, block in enumerate(self.up_blocks):
      x, new[f"up_block_{i}"] = block(x, z, cache.get(f"up_block_{i}"))
    x = jax.nn.silu(self.norm_out(x, z))  # [B, F, 8h, 8w, C_last]
    x, new["conv_out"] = self.conv_out(x, cache.get("conv_out"))
    return x, new


def latent_windows(num_frames: int, window: int = LATENT_WINDOW) -> list[tuple[int, int]]:
  """diffusers `_decode`'s split of T latent frames: [0, w + T % w), then steps of w."""
  r = num_frames % window
  return [(window * i + (0 if i == 0 else r), min(window * (i + 1) + r, num_frames))
          for i in range(max(num_frames // window, 1))]


def num_output_frames(num_frames: int) -> int:
  """Pixel frames `decode` returns for T latent frames: 1 + 4 (T - 1) for odd T (x4 in time,
  the first frame single per window of odd length)."""
  return sum(1 + 4 * (e - s - 1) if (e - s) % 2 else 4 * (e - s)
             for s, e in latent_windows(num_frames))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _decode_window(graphdef, state, z, cache):
  """One window: (state, z [B, t, h, w, C], cache | None) -> (x [B, F, H, W, 3], cache)."""
  return nnx.merge(graphdef, state)(z, cache)


def decode(decoder: CogVideoXDecoder, latents, *, scaling_factor: float = 1.0) -> np.ndarray:
  """Latents [T, C, h, w] or [B, T, C, h, w] (the DiT's layout) -> float32 host frames
  [B, F, 8h, 8w, C_out], unclamped (about [-1, 1]).

  Latents are divided by `scaling_factor` first (1.0: diffusers' `decode` as is). Windows run
  one at a time, each moved to host when done, so device memory holds one window's
  activations and the caches; jit compiles once per distinct window shape (the first differs).
  """
  z = jnp.asarray(latents)
  if z.ndim == 4:
    z = z[None]
  if z.ndim != 5 or z.shape[2] != decoder.config.latent_channels:
    raise ValueError(f"latents {z.shape}: expected [(B,) T, {decoder.config.latent_channels}, "
                     "h, w].")
  z = jnp.transpose(z / scaling_factor, (0, 1, 3, 4, 2))  # [B, T, h, w, C]
  graphdef, state = nnx.split(decoder)
  cache, frames = None, []
  for start, end in latent_windows(z.shape[1]):
    x, cache = _decode_window(graphdef, state, z[:, start:end], cache)
    frames.append(np.asarray(x.astype(jnp.float32)))
  return np.concatenate(frames, axis=1)


# --------------------------------------------------------------------------------- loading

def _read_config(path) -> VAEConfig:
  folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  file = os.path.join(folder, "config.json")
  if not os.path.isfile(file):
    raise CheckpointError(f"{path}: no config.json beside the weights; pass "
                          "config=VAEConfig(...).")
  with open(file) as f:
    return VAEConfig.from_hf_config(json.load(f))


def _hf_name(path: tuple) -> str:
  """Our parameter path -> diffusers name: the same modules, `kernel` is torch's `weight`."""
  *modules, leaf = path
  return ".".join(["decoder", *map(str, modules), "weight" if leaf == "kernel" else leaf])


def _from_torch(a: np.ndarray) -> np.ndarray:
  """Conv weight [out, in, *k] -> [*k, in, out]; vectors unchanged."""
  return a if a.ndim == 1 else np.transpose(a, (*range(2, a.ndim), 1, 0))


def load_hf(path, config: VAEConfig | None = None, *, dtype=jnp.float32,
            param_dtype=None) -> CogVideoXDecoder:
  """The decoder of a diffusers `AutoencoderKLCogVideoX` safetensors file or folder.

  `config` defaults to the folder's config.json. Parameters are stored in `param_dtype`
  (default: `dtype`). Encoder tensors (and any others outside `decoder.`) are ignored. Every
  decoder tensor is checked for presence and shape before any is read; one CheckpointError
  lists all problems (missing, wrong shape, unexpected `decoder.*` names).
  """
  path = os.fspath(path)
  c = config or _read_config(path)
  if c.use_post_quant_conv:
    raise CheckpointError("use_post_quant_conv=True is not supported (CogVideoX has none).")
  param_dtype = jnp.dtype(param_dtype or dtype)
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: CogVideoXDecoder(c, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))))
  leaves = {_hf_name(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in kp)): (kp, leaf)
            for kp, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(abstract))[0]}
  with open_tensors(path) as src:
    problems = []
    for name, (_, leaf) in leaves.items():
      torch_shape = (leaf.shape if len(leaf.shape) == 1 else
                     (leaf.shape[-1], leaf.shape[-2], *leaf.shape[:-2]))
      if name not in src:
        problems.append(f"missing {name} {list(torch_shape)}")
      elif src[name].shape != torch_shape:
        problems.append(f"{name} has shape {list(src[name].shape)}, expected "
                        f"{list(torch_shape)}")
      elif src[name].dtype.kind not in "fV":
        problems.append(f"{name} has non-float dtype {src[name].dtype}")
    problems += [f"unexpected {n}" for n in src if n.startswith("decoder.") and n not in leaves]
    if problems:
      raise CheckpointError(f"{path}: not a CogVideoX VAE decoder for {c}:\n  " +
                            "\n  ".join(problems))
    values = [jnp.asarray(_from_torch(src[name].load()).astype(param_dtype))
              for name in leaves]
  params = jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(nnx.to_pure_dict(abstract)), values)
  nnx.replace_by_pure_dict(abstract, params)
  return nnx.merge(graphdef, abstract)
