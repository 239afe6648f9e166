"""The generated storyboard dataset: sprite clips, a latent codec and a text embedder.

Everything here is deterministic and needs no download, so the tiny presets train end to end
on any machine:

  * `make_storyboard` draws a multi-scene story for one clip: one cartoon sprite (a colour and a
    shape) that moves around; the clip is cut into scenes of 1..n segments of 3 s, every new
    scene changes the background and places the sprite anew. The sprite's colour and shape are
    named ONLY in the first segment's text ("a red square moves left on grey"); later texts
    describe motion only ("it moves up", "<start_scene>it bounces on dark"), so the model must
    carry the identity across segments (the point of TTT). Texts are at most 8 tokens with the
    scene tokens (9 with </s>): the tiny 63 s preset has L = 9.
  * `render_clip` draws its RGB frames in [-1, 1] at 16 fps (48 frames per segment + frame 0).
  * `SpaceToDepthCodec` is the tiny presets' "VAE": temporal 4x like CogVideoX's (frames 0, 4,
    8, ... kept) and f x f pixels -> 3f^2 channels (tiny: 8x12 frames, f = 2, 12 channels),
    exactly invertible on the kept frames.
  * `TextEmbedder` is the tiny presets' "T5": fixed random word vectors plus a position signal.
  * `generate_dataset` writes clips in the format of `ttt_jax.data.dataset`.

Clip i is drawn from `np.random.default_rng([seed, i])`, so it is the same whatever num_clips.
"""

from __future__ import annotations

import math
import os
import re
import zlib

import numpy as np

from ttt_jax.data import dataset as dataset_lib

FPS = 16
SEGMENT_SECONDS = 3
FRAMES_PER_SEGMENT = FPS * SEGMENT_SECONDS  # 48 pixel frames = 12 latent frames
START_SCENE, END_SCENE, END_TOKEN = "<start_scene>", "<end_scene>", "</s>"
# The text embedder seed is fixed (not the data seed) so prompts at sampling time embed the
# same way for every generated dataset.
TEXT_SEED = 0

# Sprite colours (RGB in [-1, 1]), saturated so they never equal a background colour.
COLOURS = {"red": (0.9, -0.8, -0.8), "green": (-0.8, 0.8, -0.8), "blue": (-0.8, -0.6, 0.9),
           "yellow": (0.9, 0.8, -0.9), "purple": (0.6, -0.8, 0.8), "orange": (0.9, 0.1, -0.9)}
SHAPES = ("square", "circle", "triangle", "cross")
# Backgrounds: greys and one muted tint; their names are never sprite colour words.
BACKGROUNDS = {"grey": (0.0, 0.0, 0.0), "dark": (-0.7, -0.7, -0.7), "light": (0.5, 0.5, 0.5),
               "sandy": (0.4, 0.25, -0.1), "teal": (-0.5, 0.1, 0.1)}
# Motion -> the words of the text; "bounce" hops vertically, "still" stays put.
MOTIONS = {"left": "moves left", "right": "moves right", "up": "moves up", "down": "moves down",
           "bounce": "bounces", "still": "stays still"}
_DIRECTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0),
               "bounce": (0.0, 0.0), "still": (0.0, 0.0)}  # (dy, dx) per unit speed


# ----------------------------------------------------------------------------------- codec


class SpaceToDepthCodec:
  """Deterministic latent codec of the tiny presets: RGB frames <-> [T, 3*f*f, H, W] latents.

  encode: frames [F, H*f, W*f, 3] in [-1, 1], F = 4*(T-1)+1, keeps frames 0, 4, 8, ... (the
  temporal 4x of CogVideoX's VAE) and moves each f x f pixel block into channels. Channel
  order: c = rgb*f*f + dy*f + dx (rgb the colour, (dy, dx) the pixel inside the block).
  decode inverts it (depth-to-space) and repeats every latent frame after the first 4 times,
  so decode(encode(x)) equals x exactly on the kept frames.
  """

  @classmethod
  def for_channels(cls, in_channels: int) -> "SpaceToDepthCodec":
    """The codec whose 3*f*f latent channels are `in_channels` (model.in_channels)."""
    factor = max(1, math.isqrt(in_channels // 3))
    return cls(factor, in_channels=in_channels)

  def __init__(self, factor: int = 2, in_channels: int | None = None):
    self.factor = factor
    self.channels = 3 * factor * factor
    if in_channels is not None and in_channels != self.channels:
      raise ValueError(
          f"SpaceToDepthCodec(factor={factor}) makes 3*{factor}*{factor}={self.channels} latent "
          f"channels but model.in_channels={in_channels}; the generated dataset needs "
          f"in_channels = 3*factor^2 (the tiny preset's 12 = factor 2).")

  def encode(self, frames: np.ndarray) -> np.ndarray:
    """[F, H*f, W*f, 3] -> [T, 3*f*f, H, W] float32, T = (F-1)/4 + 1."""
    f = self.factor
    num, height, width, rgb = frames.shape
    if (num - 1) % 4 or height % f or width % f or rgb != 3:
      raise ValueError(f"frames of shape {frames.shape}: expected [4*(T-1)+1, H*{f}, W*{f}, 3].")
    kept = np.asarray(frames[::4], np.float32)  # [T, H*f, W*f, 3]
    t = kept.shape[0]
    x = kept.reshape(t, height // f, f, width // f, f, 3)  # [T, H, dy, W, dx, rgb]
    x = x.transpose(0, 5, 2, 4, 1, 3)  # [T, rgb, dy, dx, H, W]
    return np.ascontiguousarray(x.reshape(t, 3 * f * f, height // f, width // f))

  def decode(self, latents: np.ndarray) -> np.ndarray:
    """[T, 3*f*f, H, W] -> [4*(T-1)+1, H*f, W*f, 3] float32 (latent frames held for 4 frames)."""
    f = self.factor
    t, c, height, width = latents.shape
    if c != self.channels:
      raise ValueError(f"latents with {c} channels; SpaceToDepthCodec(factor={f}) needs "
                       f"{self.channels}.")
    x = np.asarray(latents, np.float32).reshape(t, 3, f, f, height, width)
    x = x.transpose(0, 4, 2, 5, 3, 1).reshape(t, height * f, width * f, 3)  # [T, Hf, Wf, 3]
    # Frame 0 alone, then each later latent frame stands for 4 pixel frames (causal VAE).
    return np.concatenate([x[:1], np.repeat(x[1:], 4, axis=0)], axis=0)


# -------------------------------------------------------------------------------- text


_TOKEN_RE = re.compile(r"<start_scene>|<end_scene>|</s>|[a-z0-9]+")


def tokenize(text: str) -> list[str]:
  """Lowercased words; whitespace and punctuation split, scene tokens stay one token each."""
  return _TOKEN_RE.findall(text.lower())


class TextEmbedder:
  """Deterministic word-level text embedder (the tiny presets' stand-in for T5).

  embed(text, L) -> [L, text_dim] float32: the tokens of `text` then the end token `</s>`,
  each a fixed random vector of norm ~1 seeded by crc32(word) and `seed` (stable across runs
  and machines, unlike Python's hash), plus 0.1 * a sinusoid of the token's position so word
  order matters; padded with zero vectors to exactly L (like T5's pad id, the DiT sees all L).
  """

  def __init__(self, text_dim: int, seed: int = 0):
    self.text_dim = text_dim
    self.seed = seed
    self._vectors: dict[str, np.ndarray] = {}

  def word_vector(self, word: str) -> np.ndarray:
    """The fixed [text_dim] vector of a token."""
    vec = self._vectors.get(word)
    if vec is None:
      rng = np.random.default_rng([self.seed, zlib.crc32(word.encode("utf-8"))])
      vec = (rng.standard_normal(self.text_dim) / np.sqrt(self.text_dim)).astype(np.float32)
      self._vectors[word] = vec
    return vec

  def position_signal(self, length: int) -> np.ndarray:
    """[length, text_dim] transformer-style sinusoid, scaled by 0.1."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    freq = 1.0 / (100.0 ** (np.arange(self.text_dim // 2 * 2, dtype=np.float64)[::2] /
                            max(self.text_dim, 1)))
    sig = np.zeros((length, self.text_dim))
    half = len(freq)
    sig[:, 0:2 * half:2] = np.sin(pos * freq)
    sig[:, 1:2 * half:2] = np.cos(pos * freq)
    return (0.1 * sig).astype(np.float32)

  def embed(self, text: str, length: int) -> np.ndarray:
    """[length, text_dim] float32 embedding of `text`; ValueError if it has too many tokens."""
    tokens = tokenize(text) + [END_TOKEN]
    if len(tokens) > length:
      raise ValueError(f"text {text!r} has {len(tokens)} tokens with the end token, more than "
                       f"the text length L={length} (sequence.text_length); shorten it.")
    out = np.zeros((length, self.text_dim), np.float32)  # [L, D], zeros = padding
    out[:len(tokens)] = np.stack([self.word_vector(w) for w in tokens])
    out[:len(tokens)] += self.position_signal(len(tokens))
    return out


# ---------------------------------------------------------------------------- storyboard


def make_storyboard(rng: np.random.Generator, num_segments: int) -> list[dict]:
  """Draws one clip's story: a list of `num_segments` segment dicts (3 s each).

  Each dict has the dataset fields `text`, `scene_start` (the text begins with <start_scene>:
  a new scene starts here, k >= 1), `scene_end` (the text ends with <end_scene>: the next
  segment starts a scene) and `requires_scene_transition` (= scene_start, spec 4.6), plus
  what `render_clip` draws: `colour`, `shape`, `background`, `motion`, `speed` (pixels per
  frame, as a fraction of the frame size) and `start` (the sprite's (y, x) in [0, 1] at a scene
  start, None when it continues from the previous segment).
  """
  colour = str(rng.choice(list(COLOURS)))
  shape = str(rng.choice(SHAPES))
  # Scene boundaries: each later segment starts a new scene with probability 1/2.
  new_scene = [False] + [bool(rng.random() < 0.5) for _ in range(num_segments - 1)]
  segments = []
  background = None
  for k in range(num_segments):
    if k == 0 or new_scene[k]:
      choices = [b for b in BACKGROUNDS if b != background]
      background = str(rng.choice(choices))
      start = (float(rng.uniform(0, 1)), float(rng.uniform(0, 1)))
    else:
      start = None
    motion = str(rng.choice(list(MOTIONS)))
    words = MOTIONS[motion]
    if k == 0:
      article = "an" if colour[0] in "aeiou" else "a"
      text = f"{article} {colour} {shape} {words} on {background}"
    elif new_scene[k]:
      text = f"{START_SCENE}it {words} on {background}"
    else:
      text = f"it {words}"
    scene_end = k + 1 < num_segments and new_scene[k + 1]
    if scene_end:
      text += END_SCENE
    segments.append(dict(text=text, scene_start=new_scene[k], scene_end=scene_end,
                         requires_scene_transition=new_scene[k], colour=colour, shape=shape,
                         background=background, motion=motion, start=start,
                         speed=float(rng.uniform(0.5, 1.0))))
  return segments


def _fold(u: np.ndarray, top: float) -> np.ndarray:
  """Reflects positions into [0, top] (a triangle wave): the sprite bounces off the borders."""
  if top <= 0:
    return np.zeros_like(u)
  u = np.mod(u, 2 * top)
  return np.where(u > top, 2 * top - u, u)


def _sprite_mask(shape: str, dy: np.ndarray, dx: np.ndarray, size: int) -> np.ndarray:
  """Whether pixel offsets (dy, dx) from the sprite's top-left corner are inside the sprite."""
  inside = (dy >= 0) & (dy < size) & (dx >= 0) & (dx < size)
  c = (size - 1) / 2
  if shape == "square":
    return inside
  if shape == "circle":
    return inside & ((dy - c) ** 2 + (dx - c) ** 2 <= (size / 2) ** 2)
  if shape == "triangle":  # apex on top, base at the bottom row
    return inside & (np.abs(dx - c) <= (dy + 1) / 2)
  if shape == "cross":
    arm = max(size // 6, 1)
    return inside & ((np.abs(dy - c) <= arm) | (np.abs(dx - c) <= arm))
  raise ValueError(f"unknown sprite shape {shape!r}")


def sprite_size(height: int, width: int) -> int:
  """Sprite side in pixels: half the frame's short side (4 on the tiny 8x12 frames), so the
  shapes stay distinct at that size."""
  return max(3, int(round(min(height, width) * 0.5)))


def render_clip(storyboard: list[dict], height: int, width: int) -> np.ndarray:
  """Draws a storyboard: [1 + 48*n, height, width, 3] float32 RGB frames in [-1, 1].

  Frame 0 and the 48 frames after it make segment 0; segment k is frames 48k+1 .. 48(k+1).
  The sprite moves at constant speed and bounces off the borders, so it is always in view.
  """
  size = sprite_size(height, width)
  top_y, top_x = height - size, width - size
  num_frames = 1 + FRAMES_PER_SEGMENT * len(storyboard)
  ys, xs = np.zeros(num_frames), np.zeros(num_frames)
  backgrounds = np.zeros((num_frames, 3), np.float32)
  y = x = 0.0
  for k, seg in enumerate(storyboard):
    first = 0 if k == 0 else 1 + FRAMES_PER_SEGMENT * k
    last = 1 + FRAMES_PER_SEGMENT * (k + 1)
    if seg["start"] is not None:
      y, x = seg["start"][0] * top_y, seg["start"][1] * top_x
    t = np.arange(last - first, dtype=np.float64) + (0 if k == 0 else 1)
    # Speed: about one frame width per segment at speed 1.
    step = seg["speed"] * max(width, height) / FRAMES_PER_SEGMENT
    dy, dx = _DIRECTIONS[seg["motion"]]
    seg_y, seg_x = _fold(y + dy * step * t, top_y), _fold(x + dx * step * t, top_x)
    if seg["motion"] == "bounce":  # 4 hops per segment of half the free height, away from
      hop = np.abs(np.sin(np.pi * t / (FRAMES_PER_SEGMENT / 4)))  # the nearer border
      seg_y = y - (1.0 if y >= top_y / 2 else -1.0) * hop * (top_y / 2)
    ys[first:last], xs[first:last] = seg_y, seg_x
    backgrounds[first:last] = BACKGROUNDS[seg["background"]]
    # The next segment continues from where this one ends (bounce returns to its base y).
    y, x = (y if seg["motion"] == "bounce" else float(seg_y[-1])), float(seg_x[-1])
  rows = np.arange(height)[None, :, None] - np.round(ys)[:, None, None]  # [F, H, 1]
  cols = np.arange(width)[None, None, :] - np.round(xs)[:, None, None]  # [F, 1, W]
  mask = _sprite_mask(storyboard[0]["shape"], rows, cols, size)  # [F, H, W]
  colour = np.asarray(COLOURS[storyboard[0]["colour"]], np.float32)
  frames = np.where(mask[..., None], colour, backgrounds[:, None, None, :])  # [F, H, W, 3]
  return frames.astype(np.float32)


# -------------------------------------------------------------------------------- dataset


def generate_dataset(path, config, num_clips: int | None = None, seed: int | None = None,
                     batch_clips: int = 64) -> str:
  """Writes the storyboard dataset for `config.seconds` at `path`; returns the path.

  Sizes come from the config: T = sequence.num_frames, n = sequence.num_chunks, L =
  sequence.text_length, latents [T, model.in_channels, model.latent_height,
  model.latent_width] (in_channels = 3*f*f sets the codec's factor f), text [n, L,
  model.text_dim]. The dataset appears atomically (see `dataset.DatasetWriter`).
  """
  num_clips = config.data.num_clips if num_clips is None else num_clips
  seed = config.data.seed if seed is None else seed
  m, s = config.model, config.sequence
  codec = SpaceToDepthCodec.for_channels(m.in_channels)
  embedder = TextEmbedder(m.text_dim, seed=TEXT_SEED)
  height, width = m.latent_height * codec.factor, m.latent_width * codec.factor
  n, length = s.num_chunks, s.text_length
  if n * SEGMENT_SECONDS != config.seconds or 4 * config.seconds + 1 != s.num_frames:
    raise ValueError(f"config.seconds={config.seconds} disagrees with sequence.num_frames="
                     f"{s.num_frames} / sequence.num_chunks={n}.")
  meta = dataset_lib.make_meta(
      seconds=config.seconds, num_clips=num_clips, T=s.num_frames, C=m.in_channels,
      H=m.latent_height, W=m.latent_width, n=n, L=length, text_dim=m.text_dim,
      latent_kind="sample", latent_dtype="float32",
      source=dict(generator="ttt_jax.data.storyboard", seed=seed, codec="space_to_depth_4",
                  text=f"word_hash_embedder(seed={TEXT_SEED})"))
  with dataset_lib.DatasetWriter(path, meta) as writer:
    for first in range(0, num_clips, batch_clips):
      rows = range(first, min(first + batch_clips, num_clips))
      entries, latents, texts = [], [], []
      for row in rows:
        story = make_storyboard(np.random.default_rng([seed, row]), n)
        latents.append(codec.encode(render_clip(story, height, width)))  # [T, C, H, W]
        texts.append(np.stack([embedder.embed(seg["text"], length) for seg in story]))
        entries.append(dict(clip=f"clip_{row:05d}", row=row, seconds=config.seconds,
                            segments=[{k: seg[k] for k in dataset_lib.SEGMENT_FIELDS}
                                      for seg in story],
                            sprite=dict(colour=story[0]["colour"], shape=story[0]["shape"])))
      writer.write(first, entries, np.stack(latents), np.stack(texts))
  return os.fspath(path)
