"""Layers of the CogVideoX causal 3D VAE decoder (diffusers `autoencoder_kl_cogvideox.py`) in nnx.

Activations are channels-last, [B, T, H, W, C]; convolution kernels are [*kernel_size, in, out]
(diffusers' Conv3d [out, in, kt, kh, kw] transposed by `cogvideox.load_hf`). Module and
parameter names mirror diffusers' (`resnets.0.norm1.conv_y.conv.kernel` <->
`resnets.0.norm1.conv_y.conv.weight`), so the loader maps names one to one.

Causal-conv caches: a temporal kernel of k > 1 pads the front of its input with k - 1 frames:
the previous window's last k - 1 (padded) input frames when a cache is given, else k - 1 copies
of the first frame (diffusers `pad_mode="first"`, its constant mode). Every call returns the
new cache, [B, k - 1, H, W, C], so window-by-window decoding is a pure function of
(parameters, latents, caches). 1x1x1 convs need no cache (diffusers stores one it never reads).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Cache = dict  # nested {name: [B, k - 1, H, W, C] | Cache}, the layout of diffusers' conv_cache


class Conv(nnx.Module):
  """A 2D or 3D convolution, channels last: kernel [*kernel_size, in, out], bias [out].

  Initialised as torch's Conv (uniform +-1/sqrt(fan_in)); only shapes matter for loading.
  """

  def __init__(self, cin: int, cout: int, kernel_size: tuple[int, ...], *, dtype, param_dtype,
               rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(cin * math.prod(kernel_size))
    init = lambda shape: jax.random.uniform(rngs.params(), shape, param_dtype, -bound, bound)
    self.kernel = nnx.Param(init((*kernel_size, cin, cout)))
    self.bias = nnx.Param(init((cout,)))
    self.dtype = dtype

  def __call__(self, x, padding):
    """x [N, (T,) H, W, cin] -> [N, (T',) H', W', cout]; padding: (lo, hi) per spatial dim."""
    kernel = self.kernel[...].astype(self.dtype)
    spatial = "DHW"[3 - (kernel.ndim - 2):]
    dims = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel, (1,) * (kernel.ndim - 2),
                                     padding, dimension_numbers=dims)
    return y + self.bias[...].astype(self.dtype)


class CausalConv3d(nnx.Module):
  """diffusers `CogVideoXCausalConv3d` (pad_mode "first"): causal in time, zero-padded in space.

  `(x [B, T, H, W, cin], cache [B, k-1, H, W, cin] | None) -> ([B, T, H, W, cout], new cache)`;
  the cache is None for k = 1.
  """

  def __init__(self, cin: int, cout: int, kernel_size: int, *, dtype, param_dtype, rngs):
    self.conv = Conv(cin, cout, (kernel_size,) * 3, dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs)
    self.time_pad, self.space_pad = kernel_size - 1, (kernel_size - 1) // 2

  def __call__(self, x, cache=None):
    new_cache = None
    if self.time_pad:
      front = cache if cache is not None else jnp.repeat(x[:, :1], self.time_pad, axis=1)
      x = jnp.concatenate([front.astype(x.dtype), x], axis=1)  # [B, k-1+T, H, W, C]
      new_cache = x[:, -self.time_pad:]  # of the padded input, as diffusers (T=1 keeps a pad)
    p = self.space_pad
    return self.conv(x, [(0, 0), (p, p), (p, p)]), new_cache


class GroupNorm(nnx.Module):
  """torch GroupNorm on [B, T, H, W, C]: statistics per (example, group) over T, H, W and the
  group's channels, i.e. per temporal window when called on one window. Float32 statistics."""

  def __init__(self, channels: int, groups: int, eps: float, *, dtype, param_dtype):
    self.weight = nnx.Param(jnp.ones((channels,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))
    self.groups, self.eps, self.dtype = groups, eps, dtype

  def __call__(self, x):
    C = x.shape[-1]
    xg = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, C // self.groups)
    axes = (*range(1, x.ndim - 1), x.ndim)  # [B, T, H, W, G, C/G]: all but B and G
    mean = xg.mean(axes, keepdims=True)
    var = jnp.square(xg - mean).mean(axes, keepdims=True)  # two-pass: biased, as torch
    y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
            ).astype(self.dtype)


def nearest_resize(x, size: tuple[int, int, int]):
  """torch `F.interpolate(mode="nearest", size=...)` of x [B, T, H, W, C] to size (T', H', W'):
  output index i reads input floor(i * n_in / n_out)."""
  for axis, n_out in zip((1, 2, 3), size):
    n_in = x.shape[axis]
    if n_out == n_in:
      continue
    if n_out % n_in == 0:  # the usual integer factor: a repeat, cheaper than a gather
      x = jnp.repeat(x, n_out // n_in, axis=axis)
    else:
      x = jnp.take(x, jnp.asarray(np.arange(n_out) * n_in // n_out), axis=axis)
  return x


def resize_latent_like(zq, T: int, H: int, W: int):
  """The spatial norm's resize of the latent to an activation of T frames: an odd T > 1 keeps
  the first frame separate (first -> 1 frame, the rest -> T - 1), as the time upsampling does."""
  if T > 1 and T % 2 == 1:
    return jnp.concatenate([nearest_resize(zq[:, :1], (1, H, W)),
                            nearest_resize(zq[:, 1:], (T - 1, H, W))], axis=1)
  return nearest_resize(zq, (T, H, W))


class SpatialNorm3D(nnx.Module):
  """diffusers `CogVideoXSpatialNorm3D`: GroupNorm(f) * conv_y(zq) + conv_b(zq), zq resized to f.

  The 1x1x1 convs commute with nearest resizing, so they run on the small latent and the
  result is resized (the same per-pixel arithmetic, up to 64x fewer FLOPs at the output).
  eps is 1e-6 whatever the config says: diffusers hard-codes it here.
  """

  def __init__(self, f_channels: int, zq_channels: int, groups: int, *, dtype, param_dtype,
               rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm_layer = GroupNorm(f_channels, groups, 1e-6, **kw)
    self.conv_y = CausalConv3d(zq_channels, f_channels, 1, rngs=rngs, **kw)
    self.conv_b = CausalConv3d(zq_channels, f_channels, 1, rngs=rngs, **kw)

  def __call__(self, f, zq):
    """f [B, T, H, W, Cf], zq [B, t, h, w, Cz] -> [B, T, H, W, Cf]."""
    _, T, H, W, _ = f.shape
    scale = resize_latent_like(self.conv_y(zq)[0], T, H, W)
    shift = resize_latent_like(self.conv_b(zq)[0], T, H, W)
    return self.norm_layer(f) * scale + shift


class ResnetBlock3D(nnx.Module):
  """diffusers `CogVideoXResnetBlock3D` with spatial norms, no time embedding, no dropout:
  x + conv2(silu(norm2(conv1(silu(norm1(x, zq))), zq))), x through a 1x1x1 conv if cin != cout."""

  def __init__(self, cin: int, cout: int, zq_channels: int, groups: int, *, dtype, param_dtype,
               rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = SpatialNorm3D(cin, zq_channels, groups, **kw)
    self.conv1 = CausalConv3d(cin, cout, 3, **kw)
    self.norm2 = SpatialNorm3D(cout, zq_channels, groups, **kw)
    self.conv2 = CausalConv3d(cout, cout, 3, **kw)
    # diffusers' non-causal CogVideoXSafeConv3d (kernel 1): stored as `conv_shortcut.weight`.
    self.conv_shortcut = Conv(cin, cout, (1, 1, 1), **kw) if cin != cout else None

  def __call__(self, x, zq, cache: Cache | None = None):
    cache = cache or {}
    h, c1 = self.conv1(jax.nn.silu(self.norm1(x, zq)), cache.get("conv1"))
    h, c2 = self.conv2(jax.nn.silu(self.norm2(h, zq)), cache.get("conv2"))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x, [(0, 0)] * 3)
    return h + x, {"conv1": c1, "conv2": c2}


class Upsample3D(nnx.Module):
  """diffusers `CogVideoXUpsample3D`: nearest x2 in H, W (and in T with `compress_time`, the
  first frame of an odd count kept single: T -> 2T - 1), then a per-frame 3x3 Conv2d."""

  def __init__(self, channels: int, compress_time: bool, *, dtype, param_dtype, rngs):
    self.conv = Conv(channels, channels, (3, 3), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.compress_time = compress_time

  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # [B, T, 2H, 2W, C]
    T = x.shape[1]
    if self.compress_time and T > 1:
      if T % 2:
        x = jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], 2, axis=1)], axis=1)
      else:
        x = jnp.repeat(x, 2, axis=1)
    B, T, H, W, C = x.shape
    y = self.conv(x.reshape(B * T, H, W, C), [(1, 1), (1, 1)])  # frames as a batch
    return y.reshape(B, T, H, W, -1)


class Block3D(nnx.Module):
  """diffusers `CogVideoXMidBlock3D` (upsample None) / `CogVideoXUpBlock3D`: resnets, then an
  optional upsampler. Cache: {"resnet_i": resnet cache}."""

  def __init__(self, cin: int, cout: int, num_layers: int, zq_channels: int, groups: int, *,
               upsample: bool, compress_time: bool, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock3D(cin if i == 0 else cout, cout, zq_channels, groups,
                                           **kw) for i in range(num_layers)])
    self.upsamplers = nnx.List([Upsample3D(cout, compress_time, **kw)]) if upsample else None

  def __call__(self, x, zq, cache: Cache | None = None):
    cache, new_cache = cache or {}, {}
    for i, resnet in enumerate(self.resnets):
      x, new_cache[f"resnet_{i}"] = resnet(x, zq, cache.get(f"resnet_{i}"))
    for upsampler in self.upsamplers or ():
      x = upsampler(x)
    return x, new_cache
