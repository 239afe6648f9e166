"""On-disk format of precomputed training data (latents + text embeddings) and its reader.

A dataset is one folder per duration (`<data.root>/<seconds>s`), the same for the generated
storyboard clips and for real precomputed CogVideoX latents (spec 6.7):

  meta.json     {"format": "ttt_jax.dataset", "version": 1, "seconds", "num_clips", "T", "C",
                 "H", "W", "n", "L", "text_dim", "latent_kind", "latent_dtype", "source"}
  index.jsonl   one line per clip: {"clip": "clip_00012", "row": 12, "seconds": 9,
                 "segments": [{"text": ..., "scene_start": bool, "scene_end": bool}, ...]}
                 (n segments in temporal order; extra keys are kept and ignored)
  latents/      zarr3 array [num_clips, T, C, H, W] float32 or bfloat16, one chunk per clip
  text/         zarr3 array [num_clips, n, L, text_dim], one chunk per clip

`row` is the clip's position in both arrays. `text` holds each segment's embedding of its
text as written in the index (scene tokens included, spec 4.6), padded to L. `latent_kind`:
"sample" = latents used as they are (the tiny presets' codec); "mean_logvar" = VAE moments,
C = 2 * model.in_channels (mean first), and every read draws z = mean +
exp(0.5 * clip(logvar, -30, 20)) * N(0, 1) from the generator seeded by (seed, epoch, row)
(spec 6.5), so a resumed run redraws the same z. Missing chunks read as NaN (the arrays'
fill value) and are reported, never trained on.

`DatasetWriter` writes a dataset into a temporary sibling folder and renames it into place at
the end, so a killed writer never leaves a folder that looks complete. `open_dataset` checks
everything against the config before training starts; each problem names the dataset, the
clip and the field.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid

import numpy as np
import tensorstore as ts

FORMAT, VERSION = "ttt_jax.dataset", 1
LATENT_KINDS = ("sample", "mean_logvar")
SEGMENT_FIELDS = ("text", "scene_start", "scene_end")
SHAPE_FIELDS = ("seconds", "T", "C", "H", "W", "n", "L", "text_dim")
MAX_ERRORS = 10  # problems listed in one DatasetError


class DatasetError(ValueError):
  """The dataset is missing, malformed or does not fit the config; the message says where."""


def make_meta(*, seconds, num_clips, T, C, H, W, n, L, text_dim, latent_kind="sample",
              latent_dtype="float32", source=None) -> dict:
  """The meta.json dict of a dataset."""
  if latent_kind not in LATENT_KINDS:
    raise ValueError(f"latent_kind={latent_kind!r}: use one of {LATENT_KINDS}.")
  return dict(format=FORMAT, version=VERSION, seconds=seconds, num_clips=num_clips, T=T, C=C,
              H=H, W=W, n=n, L=L, text_dim=text_dim, latent_kind=latent_kind,
              latent_dtype=latent_dtype, source=source or {})


def array_shapes(meta: dict) -> dict:
  """Array name -> its full shape under `meta`."""
  return {"latents": (meta["num_clips"], meta["T"], meta["C"], meta["H"], meta["W"]),
          "text": (meta["num_clips"], meta["n"], meta["L"], meta["text_dim"])}


def _spec(folder: pathlib.Path) -> dict:
  return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(folder)}}


def _chunk_file(folder: pathlib.Path, rank: int, row: int) -> pathlib.Path:
  """The file of row `row`'s chunk (zarr3 default key encoding: c/<row>/0/0/...)."""
  return folder.joinpath("c", str(row), *(["0"] * (rank - 1)))


class DatasetWriter:
  """Writes a dataset atomically: `with DatasetWriter(path, meta) as w: w.write(...)`.

  Rows may be written in any order and batches; on a clean exit every row must have been
  written, then index.jsonl and meta.json are written and the folder is renamed to `path`.
  If `path` appears meanwhile (another host generated it), the new copy is discarded.
  """

  def __init__(self, path, meta: dict):
    self.path = pathlib.Path(path)
    self.meta = meta
    self.entries: dict[int, dict] = {}
    self.tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    self.arrays = {}

  def __enter__(self):
    if self.path.exists():
      raise DatasetError(f"dataset {self.path} already exists; delete it to write it again.")
    self.tmp.mkdir(parents=True)
    dtype = self.meta["latent_dtype"]
    for name, shape in array_shapes(self.meta).items():
      metadata = {"data_type": dtype if name == "latents" else "float32", "shape": list(shape),
                  "chunk_grid": {"name": "regular",
                                 "configuration": {"chunk_shape": [1] + list(shape[1:])}},
                  "chunk_key_encoding": {"name": "default"}, "fill_value": "NaN"}
      self.arrays[name] = ts.open({**_spec(self.tmp / name), "metadata": metadata},
                                  create=True).result()
    return self

  def write(self, first_row: int, entries: list[dict], latents: np.ndarray, text: np.ndarray):
    """Writes clips first_row.. : index entries, latents [k, T, C, H, W], text [k, n, L, D]."""
    rows = slice(first_row, first_row + len(entries))
    futures = [self.arrays[name][rows].write(np.asarray(value).astype(
        self.arrays[name].dtype.numpy_dtype)) for name, value in (("latents", latents),
                                                                   ("text", text))]
    for k, entry in enumerate(entries):
      if entry["row"] != first_row + k:
        raise ValueError(f"entry {entry['clip']} has row {entry['row']}, written at "
                         f"{first_row + k}.")
      self.entries[entry["row"]] = entry
    for future in futures:
      future.result()

  def __exit__(self, exc_type, exc, tb):
    try:
      if exc_type is not None:
        return
      missing = sorted(set(range(self.meta["num_clips"])) - set(self.entries))
      if missing:
        raise ValueError(f"DatasetWriter: rows {missing[:5]}... were never written.")
      with open(self.tmp / "index.jsonl", "w") as f:
        for row in sorted(self.entries):
          f.write(json.dumps(self.entries[row]) + "\n")
      # meta.json last: its presence marks a complete dataset.
      with open(self.tmp / "meta.json", "w") as f:
        json.dump(self.meta, f, indent=1)
      try:
        os.rename(self.tmp, self.path)
      except OSError:
        if not (self.path / "meta.json").exists():
          raise  # not a finished copy from another process
    finally:
      shutil.rmtree(self.tmp, ignore_errors=True)


def expected_from_config(config) -> dict:
  """Field -> (value the config needs, where it comes from), for the meta.json check."""
  m, s = config.model, config.sequence
  return {"seconds": (config.seconds, "seconds"), "T": (s.num_frames, "sequence.num_frames"),
          "C": (m.in_channels, "model.in_channels"), "H": (m.latent_height, "model.latent_height"),
          "W": (m.latent_width, "model.latent_width"), "n": (s.num_chunks, "sequence.num_chunks"),
          "L": (s.text_length, "sequence.text_length"), "text_dim": (m.text_dim, "model.text_dim")}


class Dataset:
  """A validated dataset: `len(ds)` clips (index order), `ds[i]` / `ds.read(i, seed, epoch)`.

  Reads go through tensorstore, which is thread-safe, so grain's reader threads share one
  instance.
  """

  def __init__(self, path: pathlib.Path, meta: dict, entries: list[dict], arrays: dict):
    self.path, self.meta, self.entries = path, meta, entries
    self._latents, self._text = arrays["latents"], arrays["text"]

  def __len__(self) -> int:
    return len(self.entries)

  def __getitem__(self, i: int) -> dict:
    return self.read(i)

  def read(self, i: int, *, seed: int = 0, epoch: int = 0) -> dict:
    """Clip i: {"latents": [T, C, H, W] f32, "text": [n, L, D] f32, "row": int32}.

    For "mean_logvar" datasets the latents are a draw seeded by (seed, epoch, row).
    """
    entry = self.entries[i]
    row = entry["row"]
    lat, txt = self._latents[row].read(), self._text[row].read()
    latents = np.asarray(lat.result(), np.float32)  # [T, C, H, W] (C doubled for moments)
    text = np.asarray(txt.result(), np.float32)  # [n, L, D]
    for field, value in (("latents", latents), ("text", text)):
      if not np.isfinite(value).all():
        raise DatasetError(f"dataset {self.path}, clip {entry['clip']}: {field} (row {row}) "
                           "has NaN/inf values; a missing chunk reads as NaN. Regenerate or "
                           "re-precompute this clip.")
    if self.meta["latent_kind"] == "mean_logvar":
      mean, logvar = np.split(latents, 2, axis=1)  # [T, C, H, W] each
      rng = np.random.default_rng([seed, epoch, row])
      noise = rng.standard_normal(mean.shape, dtype=np.float32)
      latents = mean + np.exp(0.5 * np.clip(logvar, -30.0, 20.0)) * noise
    return {"latents": latents, "text": text, "row": np.int32(row)}


def _check_entry(entry, meta: dict) -> list[str]:
  """Problems of one parsed index line (field names as in the format)."""
  problems = []
  for field, kind in (("clip", str), ("row", int), ("segments", list)):
    if field not in entry:
      problems.append(f"field `{field}` is missing")
    elif not isinstance(entry[field], kind) or isinstance(entry[field], bool):
      problems.append(f"`{field}` is {entry[field]!r}, expected a {kind.__name__}")
  if problems:
    return problems
  if entry.get("seconds", meta["seconds"]) != meta["seconds"]:
    problems.append(f"`seconds` is {entry['seconds']}, the dataset's is {meta['seconds']}")
  if not 0 <= entry["row"] < meta["num_clips"]:
    problems.append(f"`row` {entry['row']} is outside the arrays' {meta['num_clips']} rows "
                    "(index line refers to nothing)")
  segments = entry["segments"]
  if len(segments) != meta["n"]:
    problems.append(f"`segments` has {len(segments)} entries, the dataset needs n={meta['n']} "
                    f"(one per 3 s of {meta['seconds']} s)")
  for k, seg in enumerate(segments):
    if not isinstance(seg, dict):
      problems.append(f"segments[{k}] is not an object")
      continue
    text = seg.get("text")
    if not isinstance(text, str):
      problems.append(f"segments[{k}].text is missing")
    elif not text.strip():
      problems.append(f"segments[{k}].text is empty")
    for flag in ("scene_start", "scene_end"):
      if not isinstance(seg.get(flag), bool):
        problems.append(f"segments[{k}].{flag} is {seg.get(flag)!r}, expected true/false")
  return problems


def open_dataset(path, config=None) -> Dataset:
  """Opens and validates the dataset at `path` (against `config` when given).

  Raises DatasetError listing up to MAX_ERRORS problems, each naming the clip and field.
  """
  path = pathlib.Path(path)
  where = f"dataset {path}"
  if not (path / "meta.json").is_file():
    raise DatasetError(f"{where}: no meta.json (missing or unfinished dataset folder). Generate "
                       "it with `python launch/make_dataset.py --config=...` (tiny presets) or "
                       "precompute it (spec 6.7).")
  try:
    meta = json.loads((path / "meta.json").read_text())
  except json.JSONDecodeError as e:
    raise DatasetError(f"{where}: meta.json is not valid JSON ({e}).") from e
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise DatasetError(f"{where}: meta.json has format {meta.get('format')!r} version "
                       f"{meta.get('version')!r}; this reader needs {FORMAT!r} version {VERSION}.")
  missing = [f for f in SHAPE_FIELDS + ("num_clips", "latent_kind", "latent_dtype")
             if f not in meta]
  if missing:
    raise DatasetError(f"{where}: meta.json lacks the fields {missing}.")
  if meta["latent_kind"] not in LATENT_KINDS:
    raise DatasetError(f"{where}: meta.json latent_kind={meta['latent_kind']!r}; use one of "
                       f"{LATENT_KINDS}.")

  if config is not None:
    problems = []
    for field, (want, source) in expected_from_config(config).items():
      if field == "C" and meta["latent_kind"] == "mean_logvar":
        want, source = 2 * want, f"2 * {source} (mean and logvar)"
      if meta[field] != want:
        problems.append(f"meta.json {field}={meta[field]} but the config needs {want} "
                        f"({source})")
    if problems:
      raise DatasetError(f"{where}: made for another config: " + "; ".join(problems) +
                         f". Regenerate it (delete {path}, run launch/make_dataset.py with this "
                         "--config) or point data.root at a dataset made for this config.")

  arrays = {}
  for name, shape in array_shapes(meta).items():
    try:
      arrays[name] = ts.open(_spec(path / name), open=True).result()
    except ValueError as e:
      raise DatasetError(f"{where}: array `{name}` is missing or unreadable (folder "
                         f"{path / name}): {str(e).splitlines()[0][:200]}") from e
    if tuple(arrays[name].shape) != shape:
      raise DatasetError(f"{where}: array `{name}` has shape {list(arrays[name].shape)} but "
                         f"meta.json (num_clips, T, C, H, W, n, L, text_dim) says {list(shape)}.")

  entries, problems, seen_rows, seen_clips = [], [], {}, set()
  index_file = path / "index.jsonl"
  if not index_file.is_file():
    raise DatasetError(f"{where}: index.jsonl is missing.")
  with open(index_file) as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
        if not isinstance(entry, dict):
          raise ValueError("not a JSON object")
      except ValueError as e:
        problems.append(f"{where}, index.jsonl line {line_no}: not a valid JSON object ({e})")
        continue
      clip = entry.get("clip", f"<index.jsonl line {line_no}>")
      found = _check_entry(entry, meta)
      if not found:
        row = entry["row"]
        if row in seen_rows:
          found.append(f"`row` {row} is also used by clip {seen_rows[row]}")
        if clip in seen_clips:
          found.append("`clip` name is used twice")
        for name in ("latents", "text"):
          if not _chunk_file(path / name, len(arrays[name].shape), row).is_file():
            found.append(f"{name} of row {row} is missing (no chunk file in {path / name})")
        seen_rows[row] = clip
        seen_clips.add(clip)
      problems += [f"{where}, clip {clip}: {p}" for p in found]
      if not found:
        entries.append(entry)
  if problems:
    more = f"\n... and {len(problems) - MAX_ERRORS} more" if len(problems) > MAX_ERRORS else ""
    raise DatasetError(f"{len(problems)} problem(s):\n" + "\n".join(problems[:MAX_ERRORS]) +
                       more + "\nFix or drop these index lines, or regenerate the dataset.")
  if not entries:
    raise DatasetError(f"{where}: index.jsonl lists no clips.")
  return Dataset(path, meta, entries, arrays)
