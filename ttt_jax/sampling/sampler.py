"""The sampler of upstream's `sample.py` (spec 4.2-4.5): DPM-Solver++(2M) SDE, or DDIM.

  timesteps   t_k = int(999 - k * 999 / N), k = 0..N-1 (denoising order, spec 4.2)
  A           [a_sub(t_0), ..., a_sub(t_{N-1}), 1.0]: the schedule rescaled over the N steps
  a_q         A[i] quantised to the full 1000-step table; c_skip/c_out of the denoiser use it
  D_i         the guided x0 estimate at (x_i, a_q[i], t_i), w_i the dynamic CFG scale

Every per-step coefficient is computed on the host in float64 (`SamplerTables`), so the jitted
loop is one uniform update for both samplers:

  x_{i+1} = m1[i] * x_i + c_d[i] * (c_cur[i] * D_i - c_prev[i] * D_{i-1}) + s_noise[i] * eps_i

DPM-Solver++(2M) SDE: c_d = -m2 and c_cur/c_prev the 2M correction 1 + 1/(2r), 1/(2r). The
last step (A[N] = 1, sigma = 0) has m1 = 0, c_d = 1, c_cur = 1, c_prev = 0, s_noise = 0, so
x_N = D_{N-1} exactly: the loop returns the x0 prediction at t = 19 as upstream does, with one
model call site in the scan (compiled once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax import diffusion

SAMPLERS = ("dpmpp_2m_sde", "ddim")
CFG_MODES = ("literal", "smooth")


def sampler_timesteps(num_steps: int = 50) -> np.ndarray:
  """[num_steps] int64 DDPM timesteps in denoising order (999 ... 19 for 50, spec 4.2)."""
  if num_steps < 1 or num_steps > diffusion.NUM_TIMESTEPS:
    raise ValueError(f"num_steps={num_steps}: use 1..{diffusion.NUM_TIMESTEPS}.")
  top = diffusion.NUM_TIMESTEPS - 1
  return np.array([int(top - k * top / num_steps) for k in range(num_steps)], np.int64)


def quantise(a: np.ndarray, a_full: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(a_q, index): each a replaced by the nearest entry of the full table (spec 4.3).

  The argmin is taken literally in float32, as the reference compares float32 tensors; it
  gives t - 1 for t <= 219 because a_sub and a_full are rescaled over different sets.
  """
  a_full = diffusion.alphas_cumprod_sqrt() if a_full is None else a_full  # [1000] f32
  a = np.asarray(a, np.float32)
  index = np.argmin(np.abs(a[:, None] - a_full[None, :]), axis=1)  # first minimum on ties
  return a_full[index], index


@dataclasses.dataclass(frozen=True)
class SamplerTables:
  """Host-side (NumPy float64) tables of one sampler run of N steps.

  timesteps [N] int, A [N+1], a_q [N], q_index [N]; the update coefficients m1, c_d, c_cur,
  c_prev, s_noise [N] (module docstring); for DPM-Solver++ also h, m2 [N] (spec 4.4 names,
  inf / nan at the steps where they are not used).
  """
  sampler: str
  timesteps: np.ndarray
  A: np.ndarray
  a_q: np.ndarray
  q_index: np.ndarray
  m1: np.ndarray
  c_d: np.ndarray
  c_cur: np.ndarray
  c_prev: np.ndarray
  s_noise: np.ndarray
  h: np.ndarray | None = None
  m2: np.ndarray | None = None

  @property
  def num_steps(self) -> int:
    return len(self.timesteps)

  def device_coefficients(self, cfg_scales) -> dict:
    """float32 arrays the jitted loop scans over (one row per step)."""
    rows = dict(t=self.timesteps, a_q=self.a_q, w=cfg_scales, m1=self.m1, c_d=self.c_d,
                c_cur=self.c_cur, c_prev=self.c_prev, s_noise=self.s_noise)
    return {k: jnp.asarray(np.asarray(v, np.float64), jnp.float32) for k, v in rows.items()}


def _schedule(num_steps: int):
  """(timesteps, A, a_q, q_index) shared by both samplers."""
  t = sampler_timesteps(num_steps)
  # Rescale over the selected set in ascending order (a_sub(19) = first, a_sub(999) = 0),
  # then flip to denoising order and append the terminal a = 1 (spec 4.1, 4.4).
  a_sub = diffusion.alphas_cumprod_sqrt(np.sort(t))[::-1]  # [N] f32, A[0] = 0
  A = np.concatenate([a_sub.astype(np.float64), [1.0]])  # [N+1]
  a_q, q_index = quantise(a_sub)
  return t, A, a_q.astype(np.float64), q_index


def _sigma(a):
  return np.sqrt(np.maximum(1.0 - a * a, 0.0))


def dpmpp_2m_sde_tables(num_steps: int = 50) -> SamplerTables:
  """Tables of SAT's VPSDEDPMPP2MSampler (spec 4.4), float64, IEEE inf semantics.

  lambda(a) = log(a / sigma(a)): -inf at A[0] = 0, so at i = 0 h = +inf, m1 = 0, m2 = -A[1],
  s_noise = sigma(A[1]) (x_1 is the re-noised x0 prediction), and at i = 1 r = +inf, so the 2M
  correction vanishes (D' = D_1). The last step returns D_{N-1} (module docstring).
  """
  t, A, a_q, q_index = _schedule(num_steps)
  n = num_steps
  with np.errstate(divide="ignore", invalid="ignore"):
    lam = np.log(A / _sigma(A))  # [N+1]: -inf at A = 0, +inf at A = 1
    cur, nxt = A[:-1], A[1:]
    h = lam[1:] - lam[:-1]  # [N]
    m1 = _sigma(nxt) / _sigma(cur) * np.exp(-h)
    m2 = np.expm1(-2.0 * h) * nxt
    s_noise = _sigma(nxt) * np.sqrt(-np.expm1(-2.0 * h))
    r = np.full(n, np.nan)
    r[1:] = (lam[1:n] - lam[:n - 1]) / h[1:]
    half_inv_r = np.where(np.arange(n) == 0, 0.0, 1.0 / (2.0 * r))  # i = 1: 1/inf = 0
  c_cur, c_prev, c_d = 1.0 + half_inv_r, half_inv_r, -m2
  # The last step: x_N = D_{N-1} (sigma(A[N]) = 0 makes h = +inf there; set it explicitly).
  m1[-1], c_d[-1], c_cur[-1], c_prev[-1], s_noise[-1] = 0.0, 1.0, 1.0, 0.0, 0.0
  coeffs = (m1, c_d, c_cur, c_prev, s_noise)
  if not all(np.isfinite(c).all() for c in coeffs):
    raise FloatingPointError(f"non-finite DPM-Solver++ coefficients for num_steps={n}.")
  return SamplerTables("dpmpp_2m_sde", t, A, a_q, q_index, *coeffs, h=h, m2=m2)


def ddim_tables(num_steps: int = 50) -> SamplerTables:
  """Deterministic DDIM (eta = 0) on the same v-prediction model and sub-table.

  eps_hat = (x_i - a_q D_i) / sigma(a_q) (the noise the denoiser implies, with its own c_skip),
  x_{i+1} = A[i+1] D_i + sigma(A[i+1]) eps_hat; the last step (A[N] = 1) gives D_{N-1}.
  """
  t, A, a_q, q_index = _schedule(num_steps)
  sq, s_next = _sigma(a_q), _sigma(A[1:])
  m1 = s_next / sq
  c_d = A[1:] - s_next * a_q / sq
  ones, zeros = np.ones(num_steps), np.zeros(num_steps)
  return SamplerTables("ddim", t, A, a_q, q_index, m1, c_d, ones, zeros.copy(), zeros)


def make_tables(sampler: str, num_steps: int) -> SamplerTables:
  if sampler == "dpmpp_2m_sde":
    return dpmpp_2m_sde_tables(num_steps)
  if sampler == "ddim":
    return ddim_tables(num_steps)
  raise ValueError(f"sampler={sampler!r}: use one of {SAMPLERS}.")


def dynamic_cfg_scales(timesteps, scale: float = 6.0, exp: float = 5.0, mode: str = "literal",
                       num_steps: int | None = None) -> np.ndarray:
  """[N] float64 guidance scales w_i of SAT's DynamicCFG (spec 4.5), on the host.

  literal: w = 1 + scale (1 - cos(pi ((N - t_i) / N)^exp)) / 2 with t_i the DDPM timestep (the
  reference's behaviour: pseudo-random in [1, 1 + scale]); smooth (the intended schedule):
  w = 1 + scale (1 - cos(pi (i / N)^exp)) / 2 with the step index i, rising from 1 to
  ~1 + scale. N = num_steps (default len(timesteps)).
  """
  timesteps = [int(t) for t in timesteps]
  n = len(timesteps) if num_steps is None else num_steps
  if mode == "literal":
    u = [(n - t) / n for t in timesteps]  # -18.98 ... 0.62 for N = 50
  elif mode == "smooth":
    u = [i / n for i in range(len(timesteps))]  # 0 ... (N-1)/N
  else:
    raise ValueError(f"cfg mode {mode!r}: use one of {CFG_MODES}.")
  # math.pow keeps the negative base of the literal formula real for an integral exponent.
  return np.array([1.0 + scale * (1.0 - math.cos(math.pi * math.pow(ui, exp))) / 2.0
                   for ui in u], np.float64)


def step_noise(key, i, shape):
  """eps_i: the standard normals of step i (fold_in(key, i)), float32."""
  return jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)


# A host-side progress hook the jitted loop reports to (set by `progress_to`); module-level so
# the compiled loop does not depend on which bar is shown (no retrace per call).
_PROGRESS = {"bar": None}


def _report(i):
  bar = _PROGRESS["bar"]
  if bar is not None:  # unordered callbacks may arrive out of order: count, do not assign
    if bar.n == 0:  # the first step: restart the clock so the rate leaves out compilation
      bar.reset(total=bar.total)
    bar.update(1)


@contextlib.contextmanager
def progress_to(bar):
  """Context: steps of jitted loops traced with progress=True update `bar` (a tqdm)."""
  _PROGRESS["bar"] = bar
  try:
    yield bar
  finally:
    jax.effects_barrier()  # let the last callbacks land before the bar is closed
    _PROGRESS["bar"] = None


def sample_loop(denoise_fn, operand, x_T, key, coeffs, *, progress: bool = False):
  """The sampler loop (traceable): returns x_N = D_{N-1}, the final x0 prediction.

  denoise_fn(operand, x, a_q, t, w) -> D (the guided x0 estimate, float32 like x); operand is
  any pytree it needs (parameters, text), passed through so it is a jit argument, not a
  constant. coeffs: `SamplerTables.device_coefficients(w)`. x_T [B, ...] float32 noise.
  """
  def body(carry, row):
    x, d_prev = carry
    i, c = row
    d = denoise_fn(operand, x, c["a_q"], c["t"], c["w"])
    d_prime = c["c_cur"] * d - c["c_prev"] * d_prev
    x = c["m1"] * x + c["c_d"] * d_prime + c["s_noise"] * step_noise(key, i, x.shape)
    if progress:
      jax.debug.callback(_report, i, ordered=False)
    return (x, d), None

  steps = jnp.arange(coeffs["t"].shape[0])
  (x, _), _ = jax.lax.scan(body, (x_T, jnp.zeros_like(x_T)), (steps, coeffs))
  return x


def sample(denoise_fn, x_T, key, tables: SamplerTables, cfg_scales=None, operand=None, *,
           progress: bool = False):
  """Runs the whole sampler as one jitted call (`sample_loop`); see its docstring.

  cfg_scales: [N] w_i (default ones: no guidance term for denoise_fn to use).
  """
  w = np.ones(tables.num_steps) if cfg_scales is None else cfg_scales
  return _sample_jit(denoise_fn, operand, x_T, key, tables.device_coefficients(w),
                     progress=progress)


_sample_jit = jax.jit(sample_loop, static_argnames=("denoise_fn", "progress"))
