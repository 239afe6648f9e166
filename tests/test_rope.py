"""3D RoPE against a complex128 numpy derivation of spec 2.8 / 3.3.1."""

import numpy as np
import pytest

from oracles import numpy_rope

from ttt_jax.rope import apply_rope, rope_3d_angles


@pytest.mark.parametrize("head_dim, T, h, w", [(16, 3, 2, 3), (64, 2, 3, 4), (32, 13, 1, 2)])
def test_matches_complex_rotation(head_dim, T, h, w):
  x = np.random.default_rng(0).normal(size=(T * h * w, 2, head_dim)).astype(np.float32)
  angles = rope_3d_angles(head_dim, T, h, w)
  assert angles.shape == (T * h * w, head_dim // 2)
  got = np.asarray(apply_rope(x[None], angles))[0]
  np.testing.assert_allclose(got, numpy_rope(x.astype(np.float64), head_dim, T, h, w),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_first_token_is_unrotated_and_dtype_kept():
  x = np.random.default_rng(1).normal(size=(1, 6, 1, 16)).astype(np.float32)
  out = apply_rope(x.astype(np.float16), rope_3d_angles(16, 1, 2, 3))
  assert out.dtype == np.float16
  np.testing.assert_allclose(np.asarray(out[0, 0], np.float32), x[0, 0], rtol=1e-3)


def test_head_dim_must_split():
  with pytest.raises(ValueError, match="head_dim divisible by 16"):
    rope_3d_angles(24, 1, 1, 1)
