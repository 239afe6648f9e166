"""3D rotary position embedding of CogVideoX and of the TTT layer (spec 2.8, 3.3.1).

The head dim d is split t: d/4, h: 3d/8, w: 3d/8 (16/24/24 for d = 64). Each angle rotates an
*adjacent* pair (2j, 2j+1) -- complex multiplication of x[2j] + i x[2j+1] by e^{i theta_j} --
not the GPT-NeoX rotate-half layout. Tables and the rotation are float32, as upstream's
complex64 path; the result is cast back to the input dtype.
"""

from __future__ import annotations

import jax.numpy as jnp


def rope_3d_angles(head_dim: int, num_frames: int, grid_h: int, grid_w: int,
                   theta: float = 10000.0) -> jnp.ndarray:
  """Rotation angles of every (frame, row, col) token, row-major.

  Returns:
    float32 [num_frames * grid_h * grid_w, head_dim // 2]: angles for token
    f*grid_h*grid_w + h*grid_w + w, ordered [t freqs | h freqs | w freqs].
  """
  if head_dim % 16:
    raise ValueError(f"3D RoPE needs head_dim divisible by 16 (t/h/w split d/4, 3d/8, 3d/8 into "
                     f"pairs), got head_dim={head_dim}.")
  dim_t, dim_hw = head_dim // 4, head_dim // 8 * 3

  def axis_angles(n, dim):
    freqs = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))  # [dim/2]
    return jnp.arange(n, dtype=jnp.float32)[:, None] * freqs  # [n, dim/2]

  t = axis_angles(num_frames, dim_t)[:, None, None, :]
  h = axis_angles(grid_h, dim_hw)[None, :, None, :]
  w = axis_angles(grid_w, dim_hw)[None, None, :, :]
  shape = (num_frames, grid_h, grid_w)
  angles = jnp.concatenate(
      [jnp.broadcast_to(a, shape + a.shape[-1:]) for a in (t, h, w)], axis=-1)
  return angles.reshape(-1, head_dim // 2)  # [T*h*w, d/2]


def apply_rope(x: jnp.ndarray, angles: jnp.ndarray) -> jnp.ndarray:
  """Rotates adjacent feature pairs of x by `angles`.

  Args:
    x: [..., S, H, d] tokens on axis -3, heads on axis -2.
    angles: [S, d/2] from `rope_3d_angles` (sliced to the S tokens being rotated).
  """
  cos = jnp.cos(angles)[:, None, :]  # [S, 1, d/2]
  sin = jnp.sin(angles)[:, None, :]
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  x0, x1 = xf[..., 0], xf[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)
