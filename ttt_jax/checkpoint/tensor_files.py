"""Lazy, code-free readers for checkpoint tensor files, and an atomic safetensors writer.

`open_tensors(path)` maps tensor names to `TensorInfo` entries (shape, dtype) whose `.load()`
reads only that tensor's bytes, so a 5B-parameter checkpoint converts one tensor at a time
without holding it twice in host memory. It reads:

  * a `.safetensors` file (header parsed here, so bfloat16 needs only `ml_dtypes`);
  * a folder of shards, by its `*.safetensors.index.json` `weight_map` if it has one, else
    every `*.safetensors` in it (also an index file path itself);
  * a `torch.save` zip (.pt/.pth/.bin), read by `ttt_jax.checkpoint.torch_zip` (see there,
    also for `subkey`).
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import secrets
import struct
import threading
import zipfile
from collections.abc import Mapping

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
  """A checkpoint file that cannot, or must not, be read."""


# torch dtype name: (numpy dtype, safetensors name).
_DTYPES = {"float64": (np.float64, "F64"), "float32": (np.float32, "F32"),
           "float16": (np.float16, "F16"), "bfloat16": (ml_dtypes.bfloat16, "BF16"),
           "float8_e4m3fn": (ml_dtypes.float8_e4m3fn, "F8_E4M3"),
           "float8_e5m2": (ml_dtypes.float8_e5m2, "F8_E5M2"), "bool": (np.bool_, "BOOL"),
           **{f"{t}{b}": (np.dtype(f"{t}{b}"), f"{t[0].upper()}{b}")
              for t in ("int", "uint") for b in (8, 16, 32, 64)},
           "complex64": (np.complex64, None), "complex128": (np.complex128, None)}
_ST_DTYPES = {st: np.dtype(dt) for dt, st in _DTYPES.values() if st}
_ST_NAMES = {dt: st for st, dt in _ST_DTYPES.items()}
_MAX_HEADER = 100 << 20  # the safetensors library's own limit


class _Reader:
  """Reads byte ranges of one file, or of one compressed member of a zip file.

  A plain file is shared by many tensors: seek + readinto under a lock (loads may be threaded).
  Compressed members (torch never writes them; re-zipped files may) are inflated up to pos.
  """

  def __init__(self, path, zip_file: zipfile.ZipFile | None = None, member: str = ""):
    self.what, self._zip, self._member = f"{path}:{member}" if member else path, zip_file, member
    self._file, self._lock = None if zip_file else open(path, "rb"), threading.Lock()

  def read_into(self, pos: int, out: memoryview):
    with self._lock:
      if (self._zip.fp if self._zip else self._file) is None:
        raise CheckpointError(f"{self.what}: the TensorSource is closed.")
      with (self._zip.open(self._member) if self._zip else contextlib.nullcontext(self._file)
            ) as file:
        file.seek(pos)
        while out.nbytes:
          n = file.readinto(out)
          if not n:
            raise CheckpointError(f"{self.what}: file ends early (truncated?).")
          out = out[n:]

  def close(self):
    with self._lock:
      if self._file:
        self._file.close()
        self._file = None


class TensorInfo:
  """A tensor not yet read: `.shape`, `.dtype`, and `.load()` -> new C-contiguous np.ndarray."""
  __slots__ = ("shape", "dtype", "_reader", "_base", "_offset", "_strides", "_limit", "_what")

  def __init__(self, shape, dtype, reader, base, offset=0, strides=None, limit=None, what=""):
    self.shape, self.dtype = tuple(int(n) for n in shape), np.dtype(dtype)
    self._reader, self._base, self._offset, self._what = reader, base, offset, what
    self._strides = tuple(strides) if strides is not None else _c_strides(self.shape)
    self._limit = math.prod(self.shape) if limit is None else limit  # storage size, elements

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize

  def __repr__(self):
    return f"TensorInfo(shape={self.shape}, dtype={self.dtype})"

  def load(self) -> np.ndarray:
    shape, strides, size = self.shape, self._strides, self.dtype.itemsize
    if not math.prod(shape):
      return np.empty(shape, self.dtype)
    last = self._offset + sum((n - 1) * s for n, s in zip(shape, strides))
    if self._offset < 0 or min(strides, default=0) < 0 or last >= self._limit:
      raise CheckpointError(f"{self._what}: view (offset {self._offset}, shape {shape}, strides "
                            f"{strides}) lies outside its storage of {self._limit} elements.")
    pos = self._base + self._offset * size
    if all(s == c for n, s, c in zip(shape, strides, _c_strides(shape)) if n != 1):
      # C-contiguous (size-1 dims may carry any stride): read straight into the result.
      out = np.empty(shape, self.dtype)
      self._reader.read_into(pos, memoryview(out.reshape(-1).view(np.uint8)))
      return out
    span = np.empty(last - self._offset + 1, self.dtype)  # only the bytes the view touches
    self._reader.read_into(pos, memoryview(span.view(np.uint8)))
    view = np.lib.stride_tricks.as_strided(span, shape, [s * size for s in strides])
    return view.copy()  # C order


def _c_strides(shape):
  return tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))


class TensorSource(Mapping):
  """Read-only name -> TensorInfo mapping over open files, sorted; a context manager."""

  def __init__(self, path, entries: dict, readers: list, skipped=()):
    self.path, self.skipped = path, tuple(skipped)
    self._entries, self._readers = dict(sorted(entries.items())), readers

  def __getitem__(self, key) -> TensorInfo:
    return self._entries[key]

  def __iter__(self):
    return iter(self._entries)

  def __len__(self):
    return len(self._entries)

  def close(self):
    for reader in self._readers:
      reader.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def open_tensors(path, subkey=None) -> TensorSource:
  """Opens a safetensors file or folder, or a torch.save zip; see the module docstring."""
  from ttt_jax.checkpoint.torch_zip import _open_torch_zip  # here: it imports this module
  path = os.fspath(path)
  readers, skipped = [], ()
  try:
    if subkey is not None and not (os.path.isfile(path) and zipfile.is_zipfile(path)):
      raise CheckpointError(f"{path}: subkey={subkey!r} applies only to torch.save files.")
    if os.path.isdir(path):
      entries = _open_dir(path, readers)
    elif not os.path.isfile(path):
      raise CheckpointError(f"{path}: no such file or folder.")
    else:
      with open(path, "rb") as f:
        magic = f.read(9)
      if magic.startswith(b"PK\x03\x04"):
        entries, skipped = _open_torch_zip(path, subkey, readers)
      elif path.endswith(".index.json"):
        entries = _open_index(path, readers)
      elif path.endswith(".safetensors") or magic[8:9] == b"{":
        entries = _open_safetensors(path, readers)
      elif magic.startswith(b"\x80"):
        raise CheckpointError(
            f"{path}: a legacy (pre-zip) torch.save pickle, which this reader does not open. "
            "Re-save it with torch.save(torch.load(path, weights_only=True), new_path, "
            "_use_new_zipfile_serialization=True) or convert it to safetensors.")
      else:
        raise CheckpointError(f"{path}: neither safetensors nor a torch.save zip archive.")
    return TensorSource(path, entries, readers, skipped)
  except BaseException:
    for reader in readers:
      reader.close()
    raise


def _open_safetensors(path, readers) -> dict:
  reader = _Reader(path)
  readers.append(reader)
  size = os.path.getsize(path)
  head = bytearray(8)
  reader.read_into(0, memoryview(head))
  (n,) = struct.unpack("<Q", head)
  if n > min(size - 8, _MAX_HEADER):
    raise CheckpointError(f"{path}: header length {n} exceeds the file ({size} bytes): truncated?")
  raw = bytearray(n)
  reader.read_into(8, memoryview(raw))
  try:
    header = json.loads(raw)
    assert isinstance(header, dict)
  except (ValueError, AssertionError):
    raise CheckpointError(f"{path}: the safetensors header is not a JSON object.") from None
  data_start, data_len, entries = 8 + n, size - 8 - n, {}
  for key, e in header.items():
    if key == "__metadata__":
      continue
    try:
      dtype, shape, (begin, end) = _ST_DTYPES[e["dtype"]], e["shape"], e["data_offsets"]
      ok = all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end))
    except (KeyError, TypeError, ValueError):
      raise CheckpointError(f"{path}: bad header entry for {key!r}: {e!r}.") from None
    if not ok or end - begin != math.prod(shape) * dtype.itemsize or end > data_len:
      raise CheckpointError(
          f"{path}: tensor {key!r} ({e['dtype']} {shape}) has data_offsets [{begin}, {end}] "
          f"that do not match its size or lie past the {data_len} data bytes (truncated file?).")
    entries[key] = TensorInfo(shape, dtype, reader, data_start + begin, what=f"{path}:{key}")
  return entries


def _open_index(index_path, readers) -> dict:
  folder = os.path.dirname(os.path.abspath(index_path))
  try:
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
    by_file = collections.defaultdict(list)
    for key, name in weight_map.items():
      by_file[name].append(key)
  except (ValueError, KeyError, TypeError, AttributeError):
    raise CheckpointError(f"{index_path}: not a safetensors index (no weight_map).") from None
  entries = {}
  for name, keys in by_file.items():
    shard = os.path.join(folder, name)
    if os.path.dirname(os.path.abspath(shard)) != folder:  # names only, no ../ escapes
      raise CheckpointError(f"{index_path}: shard {name!r} is not a file in {folder}.")
    found = _open_safetensors(shard, readers)
    for key in keys:
      if key not in found:
        raise CheckpointError(f"{index_path}: {key!r} is mapped to {name}, which lacks it.")
      entries[key] = found[key]
  return entries


def _open_dir(path, readers) -> dict:
  names = sorted(os.listdir(path))
  indexes = [n for n in names if n.endswith(".safetensors.index.json")]
  if len(indexes) > 1:
    raise CheckpointError(f"{path}: several index files {indexes}; pass the one to use.")
  if indexes:
    return _open_index(os.path.join(path, indexes[0]), readers)
  files = [n for n in names if n.endswith(".safetensors")]
  if not files:
    raise CheckpointError(f"{path}: a folder with no *.safetensors files; pass a checkpoint "
                          "file, or convert the weights to safetensors.")
  entries, owner = {}, {}
  for name in files:
    for key, info in _open_safetensors(os.path.join(path, name), readers).items():
      if key in entries:
        raise CheckpointError(f"{path}: {key!r} is in both {owner[key]} and {name}; pass one "
                              "file (variants such as *.fp16.safetensors repeat every key).")
      entries[key], owner[key] = info, name
  return entries


def save_safetensors(path, tensors: Mapping, metadata: Mapping | None = None):
  """Writes {name: array} (numpy, jax, ...) to a safetensors file atomically (temp + rename)."""
  path = os.fspath(path)
  header, offset, dtypes = {}, 0, {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  for key in sorted(tensors):
    value = tensors[key]
    if not hasattr(value, "dtype") or not hasattr(value, "shape"):
      value = np.asarray(value)
    dtype, shape = np.dtype(value.dtype), tuple(value.shape)
    dtype = dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype
    if dtype.newbyteorder("=") not in _ST_NAMES:
      raise CheckpointError(f"{path}: safetensors has no dtype for {key!r} ({dtype}).")
    nbytes = math.prod(shape) * dtype.itemsize
    header[key] = {"dtype": _ST_NAMES[dtype.newbyteorder("=")], "shape": list(shape),
                   "data_offsets": [offset, offset + nbytes]}
    offset, dtypes[key] = offset + nbytes, dtype
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the Rust writer does
  folder, base = os.path.split(os.path.abspath(path))
  tmp = os.path.join(folder, f".{base}.{secrets.token_hex(4)}.tmp")
  # os.open, not tempfile: mode 0o666 & ~umask, like any file the user writes.
  with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
    try:
      f.write(struct.pack("<Q", len(blob)) + blob)
      for key in sorted(tensors):  # one host copy at a time (device arrays convert here)
        array = np.asarray(tensors[key], dtypes[key], order="C")
        f.write(memoryview(array.reshape(-1).view(np.uint8)))
      f.flush()
      os.fsync(f.fileno())
    except BaseException:
      os.unlink(tmp)
      raise
  os.replace(tmp, path)
  if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)
