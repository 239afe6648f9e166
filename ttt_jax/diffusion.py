"""The diffusion process of upstream's code (spec 4.1-4.3, 6.4): noise schedule and v-prediction.

Noise level convention: x_t = a_t * x0 + sqrt(1 - a_t^2) * eps, where `a_t` is the square
root of alpha-bar ("alphas_cumprod_sqrt"; SAT calls it sigma). The network predicts
v = a * eps - sqrt(1 - a^2) * x0, and x0 = a * x_t - sqrt(1 - a^2) * v.

Training draws t over the full 1000-step table (`alphas_cumprod_sqrt()`); the sampler rescales
over the steps it uses (`alphas_cumprod_sqrt(timesteps)`), which is why the two differ slightly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NUM_TIMESTEPS = 1000
LINEAR_START, LINEAR_END = 0.00085, 0.012


def alphas_cumprod_sqrt(timesteps=None, *, shift_scale: float = 1.0) -> np.ndarray:
  """a_t for `timesteps` (default all 1000), zero-terminal-SNR rescaled over that set.

  "ZeroSNRDDPMDiscretization" (spec 4.1): scaled-linear betas and their cumulative product in
  float64, the SNR shift (a no-op at shift_scale 1), float32, square root, then
  a <- (a - a_last) * a_first / (a_first - a_last) so the last entry of the set is exactly 0.
  """
  t = np.arange(NUM_TIMESTEPS, dtype=np.float64)
  betas = (np.sqrt(LINEAR_START) + (np.sqrt(LINEAR_END) - np.sqrt(LINEAR_START)) * t /
           (NUM_TIMESTEPS - 1)) ** 2
  alphas_cumprod = np.cumprod(1.0 - betas)
  alphas_cumprod = alphas_cumprod / (shift_scale + (1.0 - shift_scale) * alphas_cumprod)
  if timesteps is not None:
    alphas_cumprod = alphas_cumprod[np.asarray(timesteps)]
  a = np.sqrt(alphas_cumprod.astype(np.float32))
  a_first, a_last = a[0], a[-1]
  return ((a - a_last) * a_first / (a_first - a_last)).astype(np.float32)


def add_noise(x0, noise, a):
  """x_t = a * x0 + sqrt(1 - a^2) * noise; `a` is [B], broadcast over the sample axes."""
  a = a.reshape(a.shape + (1,) * (x0.ndim - 1))
  return a * x0 + jnp.sqrt(1.0 - a * a) * noise


def v_target(x0, noise, a):
  """The v-prediction target a * noise - sqrt(1 - a^2) * x0."""
  a = a.reshape(a.shape + (1,) * (x0.ndim - 1))
  return a * noise - jnp.sqrt(1.0 - a * a) * x0


def stratified_timesteps(key, batch_size: int) -> jax.Array:
  """Integer t in [0, 1000) per sample, stratified over the batch as upstream over its ranks.

  Spec 6.4 with R = batch_size: the smallest i >= 1 with R % i == 0 and 1000 % (R / i) == 0
  gives G = R / i strata of 1000 / G steps; sample r draws uniformly from stratum r // i. Here
  the samples of the global batch play the role of upstream's data-parallel ranks.
  """
  i = next(i for i in range(1, batch_size + 1)
           if batch_size % i == 0 and NUM_TIMESTEPS % (batch_size // i) == 0)
  width = NUM_TIMESTEPS // (batch_size // i)
  stratum = jnp.arange(batch_size) // i
  return stratum * width + jax.random.randint(key, (batch_size,), 0, width)


def v_loss(prediction, x0, noise, a):
  """Per-sample mean of (F - v)^2, [B].

  Upstream writes it as mean(w * (x0_hat - x0)^2) with w = 1 / (1 - a^2), which is the same
  quantity algebraically (spec 6.4); this form has no 1/(1 - a^2) blow-up near t = 0.
  """
  err = jnp.square(prediction - v_target(x0, noise, a))
  return err.reshape(err.shape[0], -1).mean(axis=1)
