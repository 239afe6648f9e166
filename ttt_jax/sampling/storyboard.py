"""Storyboard files: the prompts of `launch/sample.py` (spec 4.6).

A storyboard is `.json` (a JSON array of videos) or `.jsonl` (one video per line). A video is
an array of segment objects, one per 3 s segment:

  {"text": "a red square moves left on grey",     required, non-empty
   "requires_scene_transition": false,             optional bool: a new scene starts here
   "neg_text": "blurry"}                           optional negative prompt

The number of segments n sets the duration, 3n seconds, which must be one of
`ttt_jax.config.DURATIONS` (n = 1, 3, 6, 10, 21). Every error is a `StoryboardError` that names
the file, the video and segment index, the field and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from ttt_jax import config as config_lib
from ttt_jax.data.storyboard import END_SCENE, SEGMENT_SECONDS, START_SCENE

FIELDS = ("text", "requires_scene_transition", "neg_text")
SEGMENT_COUNTS = tuple(s // SEGMENT_SECONDS for s in config_lib.DURATIONS)  # (1, 3, 6, 10, 21)


class StoryboardError(ValueError):
  """A malformed storyboard; the message names file, video, segment, field and the fix."""


@dataclasses.dataclass(frozen=True)
class Segment:
  text: str
  requires_scene_transition: bool = False
  neg_text: str | None = None


def seconds_of(video) -> int:
  """The duration in seconds of a video of len(video) 3 s segments."""
  return SEGMENT_SECONDS * len(video)


def _where(path, video: int, segment: int | None = None, field: str | None = None) -> str:
  out = f"{path}: video {video}"
  if segment is not None:
    out += f", segment {segment}"
  if field is not None:
    out += f", field {field!r}"
  return out


def parse_video(obj, *, path="<storyboard>", index: int = 0,
                max_segments: int | None = None) -> list[Segment]:
  """Checks one video (a list of segment dicts) and returns its Segments."""
  where = _where(path, index)
  if not isinstance(obj, list) or not obj:
    raise StoryboardError(f"{where}: expected a non-empty JSON array of segment objects, got "
                          f"{type(obj).__name__}; write [{{\"text\": ...}}, ...].")
  limit = max(SEGMENT_COUNTS) if max_segments is None else max_segments
  if len(obj) > limit:
    raise StoryboardError(f"{where}: {len(obj)} segments, more than the {limit} this config "
                          f"supports ({SEGMENT_SECONDS * limit} s); split the story into "
                          "several videos.")
  if len(obj) not in SEGMENT_COUNTS:
    seconds = ", ".join(f"{n} ({SEGMENT_SECONDS * n} s)" for n in SEGMENT_COUNTS)
    raise StoryboardError(f"{where}: {len(obj)} segments match no supported duration; a video "
                          f"needs one of {seconds} segments of 3 s. Add or remove segments.")
  segments = []
  for k, seg in enumerate(obj):
    if not isinstance(seg, dict):
      raise StoryboardError(f"{_where(path, index, k)}: expected a JSON object with a \"text\" "
                            f"field, got {type(seg).__name__}.")
    unknown = sorted(set(seg) - set(FIELDS))
    if unknown:
      raise StoryboardError(f"{_where(path, index, k, unknown[0])}: unknown field; the fields "
                            f"are {', '.join(FIELDS)} (check the spelling).")
    text = seg.get("text")
    if not isinstance(text, str) or not text.strip():
      got = "missing" if "text" not in seg else f"{text!r}"
      raise StoryboardError(f"{_where(path, index, k, 'text')}: {got}; every segment needs a "
                            "non-empty text string describing its 3 seconds.")
    flag = seg.get("requires_scene_transition", False)
    if not isinstance(flag, bool):
      raise StoryboardError(f"{_where(path, index, k, 'requires_scene_transition')}: {flag!r} "
                            "is not a boolean; use true or false (JSON, no quotes).")
    neg = seg.get("neg_text")
    if neg is not None and not isinstance(neg, str):
      raise StoryboardError(f"{_where(path, index, k, 'neg_text')}: {neg!r} is not a string; "
                            "use a string or leave the field out.")
    segments.append(Segment(text, flag, neg))
  return segments


def load(path, *, max_segments: int | None = None) -> list[list[Segment]]:
  """The videos of a `.json` / `.jsonl` storyboard file (module docstring)."""
  path = pathlib.Path(path)
  try:
    raw = path.read_text(encoding="utf-8")
  except OSError as e:
    raise StoryboardError(f"{path}: cannot read the storyboard ({e.strerror}); check the "
                          "--storyboard path.") from e
  if path.suffix == ".jsonl":
    videos = []
    for line_no, line in enumerate(raw.splitlines(), 1):
      if not line.strip():
        continue
      try:
        videos.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise StoryboardError(f"{path}: line {line_no} (video {len(videos)}) is not valid "
                              f"JSON ({e.msg} at column {e.colno}); each line must be one "
                              "video, a JSON array of segment objects.") from e
  elif path.suffix == ".json":
    try:
      videos = json.loads(raw)
    except json.JSONDecodeError as e:
      raise StoryboardError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column "
                            f"{e.colno}); the file must be a JSON array of videos.") from e
    if not isinstance(videos, list):
      raise StoryboardError(f"{path}: the top level is a {type(videos).__name__}; it must be "
                            "a JSON array of videos, each an array of segment objects.")
    if videos and all(isinstance(v, dict) for v in videos):
      raise StoryboardError(f"{path}: the top level is one video (an array of segment "
                            "objects); wrap it in another array: [[{...}, ...]].")
  else:
    raise StoryboardError(f"{path}: unknown storyboard format {path.suffix!r}; use .json (an "
                          "array of videos) or .jsonl (one video per line).")
  if not videos:
    raise StoryboardError(f"{path}: holds no video; add at least one array of segments.")
  return [parse_video(v, path=path, index=i, max_segments=max_segments)
          for i, v in enumerate(videos)]


def prompts(video: list[Segment]) -> tuple[list[str], list[str]]:
  """(conditional, negative) texts per segment, with the scene tokens of spec 4.6.

  The first segment's flag is ignored; for k >= 1 with the flag set, `<end_scene>` is appended
  to text k-1 and `<start_scene>` prepended to text k (plain concatenation, no spaces).
  Negatives are `neg_text` or "" and get no scene tokens.
  """
  texts = [seg.text for seg in video]
  for k in range(1, len(video)):
    if video[k].requires_scene_transition:
      texts[k - 1] = texts[k - 1] + END_SCENE
      texts[k] = START_SCENE + texts[k]
  negatives = [seg.neg_text if seg.neg_text is not None else "" for seg in video]
  return texts, negatives
