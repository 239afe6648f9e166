"""Latents -> pixels -> files: the tiny codec's decode, mp4 (spec 4.7) and a contact sheet.

Frames are float [F, H, W, 3] in [-1, 1]; they become uint8 as upstream does:
clamp((x + 1) / 2, 0, 1) * 255, truncated. The tiny presets' 8x12 frames are upscaled by an
integer factor (nearest neighbour) since players and viewers handle such small videos badly.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

from ttt_jax.data.storyboard import FPS, SpaceToDepthCodec

MIN_HEIGHT = 192  # default output height (pixels) the upscale factor aims for
MACRO_BLOCK = 16  # H.264 macro block: ffmpeg wants both sizes divisible by it


def decode_tiny(latents: np.ndarray, config) -> np.ndarray:
  """[T, C, H, W] tiny-preset latents -> [4(T-1)+1, fH, fW, 3] frames in [-1, 1] (C = 3f^2)."""
  try:
    codec = SpaceToDepthCodec.for_channels(config.model.in_channels)
  except ValueError as e:
    raise ValueError(f"{e} These latents need the VAE decoder.") from e
  return codec.decode(np.asarray(latents))


def to_uint8(frames: np.ndarray) -> np.ndarray:
  """[-1, 1] -> uint8: clamp((x + 1) / 2, 0, 1) * 255, truncated (spec 4.7)."""
  x = np.clip((np.asarray(frames, np.float32) + 1.0) / 2.0, 0.0, 1.0) * 255.0
  return x.astype(np.uint8)


def default_upscale(height: int, width: int) -> int:
  """The smallest integer factor making the frame >= MIN_HEIGHT high; bumped (at most to the
  next multiple) so both sizes are multiples of MACRO_BLOCK when that is reachable."""
  k = max(1, math.ceil(MIN_HEIGHT / height))
  for cand in range(k, 2 * k + 1):
    if (cand * height) % MACRO_BLOCK == 0 and (cand * width) % MACRO_BLOCK == 0:
      return cand
  return k


def upscale_frames(frames: np.ndarray, factor: int) -> np.ndarray:
  """[F, H, W, c] -> [F, H*factor, W*factor, c], nearest neighbour."""
  if factor == 1:
    return frames
  return np.repeat(np.repeat(frames, factor, axis=1), factor, axis=2)


def write_mp4(frames: np.ndarray, path, fps: int = FPS, upscale: int | None = None,
              quality: int = 8) -> pathlib.Path:
  """Writes frames [F, H, W, 3] in [-1, 1] as an H.264 mp4 (imageio + ffmpeg); returns path.

  upscale: integer nearest-neighbour factor (default: at least MIN_HEIGHT pixels high).
  """
  import imageio.v2 as imageio  # pylint: disable=g-import-not-at-top
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"frames must be [F, H, W, 3], got shape {frames.shape}.")
  factor = default_upscale(*frames.shape[1:3]) if upscale is None else upscale
  pixels = upscale_frames(to_uint8(frames), factor)  # [F, H*k, W*k, 3] uint8
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # macro_block_size: sizes not divisible by it are resized by imageio (with a warning); the
  # default upscale avoids that. yuv420p (the default) plays everywhere.
  with imageio.get_writer(path, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                          quality=quality, macro_block_size=MACRO_BLOCK) as writer:
    for frame in pixels:
      writer.append_data(frame)
  return path


def contact_sheet(frames: np.ndarray, path, every: int = 12, columns: int = 8,
                  upscale: int | None = None, gap: int = 2) -> pathlib.Path:
  """Writes every `every`-th frame (from frame 0) as a PNG grid, `columns` wide; returns path.

  With every = 12 and 16 fps a tile is 0.75 s apart, 4 tiles per 3 s segment.
  """
  import imageio.v2 as imageio  # pylint: disable=g-import-not-at-top
  tiles = to_uint8(np.asarray(frames)[::every])  # [K, H, W, 3]
  # Tiles at half the video's default size: a sheet of many frames stays a sensible width.
  factor = max(1, default_upscale(*tiles.shape[1:3]) // 2) if upscale is None else upscale
  tiles = upscale_frames(tiles, factor)
  k, h, w, _ = tiles.shape
  cols = min(columns, k)
  rows = math.ceil(k / cols)
  sheet = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, 3), 255, np.uint8)
  for i, tile in enumerate(tiles):
    r, c = divmod(i, cols)
    y, x = gap + r * (h + gap), gap + c * (w + gap)
    sheet[y:y + h, x:x + w] = tile
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  imageio.imwrite(path, sheet, format="PNG")
  return path
