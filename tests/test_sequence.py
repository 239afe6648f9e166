"""SequenceLayout: the spec's worked 9 s example, interleave round trips, the eta quirk."""

import numpy as np
import pytest

from ttt_jax.sequence import SequenceLayout

P5B = dict(grid_h=30, grid_w=45)  # 1350 tokens per latent frame


def test_9s_interleave_matches_spec_example():
  """Spec 3.4: [0,502) text0; [502,18052) frames 0..12; [18052,18554) text1; [18554,34754)
  frames 13..24; [34754,35256) text2; [35256,51456) frames 25..36."""
  lay = SequenceLayout(num_chunks=3, text_length=502, num_frames=37, **P5B)
  assert lay.total_tokens == 51456 and lay.init_offset == 18052 and lay.base_offset == 16702
  pi = lay.interleave_permutation  # pre-interleave index of every interleaved position
  text0, video0 = 0, 3 * 502
  expected = [
      ((0, 502), text0),
      ((502, 18052), video0),  # frames 0..12
      ((18052, 18554), text0 + 502),
      ((18554, 34754), video0 + 13 * 1350),  # frames 13..24
      ((34754, 35256), text0 + 1004),
      ((35256, 51456), video0 + 25 * 1350),  # frames 25..36
  ]
  for (start, stop), source in expected:
    np.testing.assert_array_equal(pi[start:stop], source + np.arange(stop - start))


@pytest.mark.parametrize("n, L, T, h, w", [
    (1, 18, 13, 2, 3), (3, 22, 37, 2, 3), (6, 5, 73, 2, 3), (21, 10, 253, 2, 3),
    (2, 7, 25, 3, 5),
])
def test_interleave_round_trip(n, L, T, h, w):
  lay = SequenceLayout(num_chunks=n, text_length=L, num_frames=T, grid_h=h, grid_w=w)
  x = np.random.default_rng(0).normal(size=(2, lay.total_tokens, 3))
  y = np.asarray(lay.interleave(x, axis=1))
  assert y.shape == x.shape
  np.testing.assert_array_equal(np.asarray(lay.undo_interleave(y, axis=1)), x)
  np.testing.assert_array_equal(np.sort(lay.interleave_permutation), np.arange(lay.total_tokens))
  if n == 1:
    np.testing.assert_array_equal(y, x)


def test_each_scene_is_its_text_then_its_frames():
  lay = SequenceLayout(num_chunks=3, text_length=4, num_frames=37, grid_h=1, grid_w=2)
  pi = lay.interleave_permutation
  text_tokens, frame_of = lay.seq_text_length, lambda p: (p - text_tokens) // 2
  pos = 0
  for s, frames in enumerate([range(0, 13), range(13, 25), range(25, 37)]):
    np.testing.assert_array_equal(pi[pos:pos + 4], np.arange(4 * s, 4 * s + 4))
    pos += 4
    video = pi[pos:pos + 2 * len(frames)]
    assert sorted(set(frame_of(video))) == list(frames)
    pos += 2 * len(frames)
  assert pos == lay.total_tokens


def test_eta_source_mini_batches():
  lay = SequenceLayout(num_chunks=3, text_length=502, num_frames=37, **P5B)
  src = lay.eta_source_mini_batches(64)
  assert src.shape == (804,)
  # Interleaved mini-batch 0 is all text_0; mini-batch 7 covers positions 448..511 whose last
  # token (511) is video token 9 of frame 0, pre-interleave position 1506 + 9 = 1515.
  assert src[0] == 0 and src[7] == 1515 // 64
  single = SequenceLayout(num_chunks=1, text_length=498, num_frames=13, **P5B)
  np.testing.assert_array_equal(single.eta_source_mini_batches(64), np.arange(282))


def test_bad_layouts_raise_clear_errors():
  with pytest.raises(ValueError, match="text_length"):
    SequenceLayout(num_chunks=1, text_length=0, num_frames=13, grid_h=2, grid_w=3)
  with pytest.raises(ValueError, match="num_frames=5 does not split"):
    SequenceLayout(num_chunks=3, text_length=4, num_frames=5, grid_h=1, grid_w=1)
  lay = SequenceLayout(num_chunks=1, text_length=3, num_frames=13, grid_h=2, grid_w=3)
  with pytest.raises(ValueError, match="not a multiple of mini_batch_size=16"):
    lay.num_mini_batches(16)
