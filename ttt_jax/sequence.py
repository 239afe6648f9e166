"""Static token layout of a multi-segment video sequence and the TTT interleave.

A sample of n 3-second segments is one sequence ordered [text_0 .. text_{n-1} | video frames
0..T-1] (spec 2.5). The TTT scan reads it *interleaved* by scene (spec 3.4):

  [text_0 | frames 0..fpc] [text_1 | next fpc frames] ... [text_{n-1} | last fpc frames]

where the first scene carries the `T mod fpc` extra frame(s). Every index here depends only on
(n, L, T, P), so the permutations are static slices: XLA sees concatenations, never gathers.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
  """Where text and video tokens sit in one sample's sequence.

  Attributes:
    num_chunks: n, the number of 3 s segments (one text chunk each).
    text_length: L, text tokens per segment.
    num_frames: T, latent frames of the whole video.
    grid_h: token rows per latent frame (latent height / patch size).
    grid_w: token columns per latent frame (latent width / patch size).
  """

  num_chunks: int
  text_length: int
  num_frames: int
  grid_h: int
  grid_w: int

  def __post_init__(self):
    for name in ("num_chunks", "text_length", "num_frames", "grid_h", "grid_w"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"SequenceLayout.{name} must be a positive integer, got {value!r}.")
    if self.num_frames < self.num_chunks:
      raise ValueError(
          f"SequenceLayout.num_frames={self.num_frames} is smaller than num_chunks="
          f"{self.num_chunks}: every segment needs at least one latent frame.")
    leftover = self.num_frames - self.num_chunks * self.frames_per_chunk
    if leftover >= self.frames_per_chunk:
      raise ValueError(
          f"SequenceLayout: num_frames={self.num_frames} does not split into num_chunks="
          f"{self.num_chunks} scenes of {self.frames_per_chunk} frames plus fewer than "
          f"{self.frames_per_chunk} extra frame(s) for the first scene; use T = n*fpc + r, r < fpc "
          "(e.g. T = 12n + 1).")

  # Derived sizes, named as upstream's SequenceMetadata (spec 2.5).
  @property
  def tokens_per_frame(self) -> int:
    return self.grid_h * self.grid_w

  @property
  def seq_text_length(self) -> int:
    return self.num_chunks * self.text_length

  @property
  def num_video_tokens(self) -> int:
    return self.num_frames * self.tokens_per_frame

  @property
  def total_tokens(self) -> int:
    return self.seq_text_length + self.num_video_tokens

  @property
  def is_multiscene(self) -> bool:
    return self.num_chunks > 1

  @property
  def frames_per_chunk(self) -> int:
    return self.num_frames // self.num_chunks

  @property
  def base_offset(self) -> int:
    """Interleaved length of every scene after the first."""
    return self.frames_per_chunk * self.tokens_per_frame + self.text_length

  @property
  def init_offset(self) -> int:
    """Interleaved length of the first scene (it holds the T mod fpc extra frames)."""
    fpc = self.frames_per_chunk
    return (fpc + self.num_frames % fpc) * self.tokens_per_frame + self.text_length

  def num_mini_batches(self, mini_batch_size: int) -> int:
    """Number of TTT mini-batches; raises if the sequence does not split evenly."""
    if self.total_tokens % mini_batch_size:
      raise ValueError(
          f"The sequence has {self.total_tokens} tokens (n*L = {self.num_chunks}*"
          f"{self.text_length} text + T*P = {self.num_frames}*{self.tokens_per_frame} video), "
          f"not a multiple of mini_batch_size={mini_batch_size}. Choose text_length so that "
          f"(n*L + T*P) % mini_batch_size == 0 (spec 1.3).")
    return self.total_tokens // mini_batch_size

  def scene_spans(self) -> tuple[tuple[tuple[int, int], tuple[int, int]], ...]:
    """Per interleaved scene: its (text, video) [start, stop) spans in pre-interleave order."""
    n, L, T0 = self.num_chunks, self.text_length, self.seq_text_length
    first_video = self.init_offset - L
    other_video = self.base_offset - L
    spans = []
    for s in range(n):
      v0 = 0 if s == 0 else first_video + (s - 1) * other_video
      v1 = first_video + s * other_video
      spans.append(((s * L, (s + 1) * L), (T0 + v0, T0 + v1)))
    return tuple(spans)

  def interleave(self, x, axis: int = 1):
    """[text_0..text_{n-1} | video] -> [text_0 | video_0] .. [text_{n-1} | video_{n-1}].

    The identity for a single segment (upstream interleaves only when n > 1).
    """
    if not self.is_multiscene:
      return x
    pieces = []
    for text, video in self.scene_spans():
      pieces += [_slice(x, *text, axis), _slice(x, *video, axis)]
    return _concatenate(pieces, axis)

  def undo_interleave(self, x, axis: int = 1):
    """Inverse of `interleave`: back to [all text | all video]."""
    if not self.is_multiscene:
      return x
    texts, videos, pos = [], [], 0
    for (t0, t1), (v0, v1) in self.scene_spans():
      texts.append(_slice(x, pos, pos + t1 - t0, axis))
      pos += t1 - t0
      videos.append(_slice(x, pos, pos + v1 - v0, axis))
      pos += v1 - v0
    return _concatenate(texts + videos, axis)

  def reverse(self, x, axis: int = 1):
    """The backward scan's reversal (spec 3.2): all video tokens reversed, text chunks in
    reverse order (tokens inside a chunk kept; a single chunk stays as it is). An involution."""
    T0 = self.seq_text_length
    flip = np.flip if isinstance(x, np.ndarray) else jnp.flip
    video = flip(_slice(x, T0, self.total_tokens, axis), axis=axis)
    L = self.text_length
    texts = [_slice(x, s * L, (s + 1) * L, axis) for s in reversed(range(self.num_chunks))]
    return _concatenate(texts + [video], axis)

  @functools.cached_property
  def interleave_permutation(self) -> np.ndarray:
    """pi[q] = pre-interleave position of the token at interleaved position q."""
    return self.interleave(np.arange(self.total_tokens), axis=0)

  def eta_source_mini_batches(self, mini_batch_size: int) -> np.ndarray:
    """For the kernel-faithful step size (spec 3.5): source mini-batch per interleaved one.

    Upstream builds the step-size matrix before interleaving, permutes its *rows* with the
    tokens and its kernel reads the last row. Interleaved mini-batch n' therefore takes the
    eta vector of the original mini-batch holding the token now in its last slot.
    """
    num_mb = self.num_mini_batches(mini_batch_size)
    last_slots = np.arange(num_mb) * mini_batch_size + mini_batch_size - 1
    return self.interleave_permutation[last_slots] // mini_batch_size


def _slice(x, start: int, stop: int, axis: int):
  index = [slice(None)] * x.ndim
  index[axis] = slice(start, stop)
  return x[tuple(index)]


def _concatenate(pieces, axis: int):
  # numpy in, numpy out: static index tables must stay concrete under jit.
  if all(isinstance(p, np.ndarray) for p in pieces):
    return np.concatenate(pieces, axis=axis)
  return jnp.concatenate(pieces, axis=axis)
