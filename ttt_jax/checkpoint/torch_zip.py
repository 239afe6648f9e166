"""Lazy, code-free reader for `torch.save` zip archives (.pt/.pth/.bin), for `open_tensors`.

`<archive>/data.pkl` is unpickled by an allow-list that builds lazy records only (no torch,
no other code); tensors are strided views of `<archive>/data/<key>` storages, read with
seek + readinto.

Which dict of a torch file holds the tensors: `subkey` if given; else the top-level dict if
it holds any tensor; else its "model" entry (upstream training checkpoints are
{"model": ..., "optimizer": ..., ...}). In the chosen dict, non-tensor values (and nested
dicts) are left out and listed in `TensorSource.skipped`.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import types
import zipfile
from typing import NamedTuple

import numpy as np

from ttt_jax.checkpoint.tensor_files import _DTYPES, CheckpointError, TensorInfo, _Reader

_TORCH_DTYPES = {name: np.dtype(dt) for name, (dt, _) in _DTYPES.items()}
# Legacy typed storages name the dtype; torch 2.x writes these for the classic dtypes and an
# `UntypedStorage` (sized in bytes) plus `_rebuild_tensor_v3(..., dtype)` for newer ones.
_STORAGES = {"DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
             "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
             "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
             "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
             "ComplexDoubleStorage": "complex128"}


class _Storage(NamedTuple):
  """A `<archive>/data/<key>` storage: numel elements of dtype, or numel bytes if untyped.

  This and `_Tensor` are NamedTuples so that a pickle's BUILD opcode cannot rewrite them.
  """
  reader: object
  base: int
  dtype: np.dtype | None
  numel: int
  what: str


class _Tensor(NamedTuple):
  info: TensorInfo


def _rebuild(storage, offset, size, stride, dtype=None):
  ints = lambda xs: isinstance(xs, tuple) and all(type(x) is int and x >= 0 for x in xs)
  if not (isinstance(storage, _Storage) and (dtype is None or dtype in _DTYPE_TAGS)
          and ints((offset,)) and ints(size) and ints(stride) and len(size) == len(stride)):
    raise CheckpointError(f"bad tensor record: storage {storage!r}, offset {offset!r}, size "
                          f"{size!r}, stride {stride!r}, dtype {dtype!r}.")
  dtype = storage.dtype if dtype is None else _TORCH_DTYPES[dtype[1]]
  nbytes = storage.numel * (1 if storage.dtype is None else storage.dtype.itemsize)
  return _Tensor(TensorInfo(size, dtype, storage.reader, storage.base, offset, stride,
                            nbytes // dtype.itemsize, storage.what))


def _encode(text, encoding="utf-8"):  # protocol-2 pickles write bytes as _codecs.encode(str, ..)
  if encoding not in ("latin1", "latin-1"):
    raise CheckpointError(f"refuses _codecs.encode with encoding {encoding!r}.")
  return text.encode(encoding)


# Roughly torch.load(weights_only=True)'s allow-list, minus quantized/sparse/subclass tensors.
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "Counter"): collections.Counter,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex, ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): _encode,
    ("torch", "Size"): tuple, ("torch", "device"): lambda *a: ":".join(map(str, a)),
    ("torch._utils", "_rebuild_tensor"): _rebuild,
    # (storage, offset, size, stride, requires_grad, hooks[, dtype for v3][, metadata])
    ("torch._utils", "_rebuild_tensor_v2"): lambda s, o, size, stride, *_: _rebuild(
        s, o, size, stride),
    ("torch._utils", "_rebuild_tensor_v3"): lambda s, o, size, stride, _r, _h, dtype, *_: (
        _rebuild(s, o, size, stride, dtype)),
    ("torch._utils", "_rebuild_parameter"): lambda data, *_: data,
    ("torch._utils", "_rebuild_parameter_with_state"): lambda data, *_: data,
    # Storage classes and dtypes become immutable tags (torch.float32 -> ("dtype", "float32")).
    ("torch.storage", "UntypedStorage"): ("dtype", None),
    **{("torch", name): ("dtype", dt) for name, dt in _STORAGES.items()},
    **{("torch", name): ("dtype", name) for name in _TORCH_DTYPES},
}
_DTYPE_TAGS = {("dtype", name) for name in _TORCH_DTYPES}


class _Unpickler(pickle.Unpickler):
  """Builds `_Tensor` records from torch's data.pkl; every other global is refused."""

  def __init__(self, data, zip_file, prefix, reader, path):
    super().__init__(io.BytesIO(data))
    self.zip, self.prefix, self.reader, self.path, self.storages = (
        zip_file, prefix, reader, path, {})

  def find_class(self, module, name):
    # Protocol-2 pickles name builtins "__builtin__"; an overridden find_class sees it raw.
    module = "builtins" if module == "__builtin__" else module
    if (module, name) not in _ALLOWED:
      raise CheckpointError(
          f"{self.path}: refuses to unpickle {module}.{name}: only tensors, storages and "
          "plain containers are allowed. Re-save only the state dict (or as safetensors).")
    value = _ALLOWED[module, name]
    if isinstance(value, types.FunctionType):  # a fresh copy: BUILD may set its __defaults__
      value = types.FunctionType(value.__code__, value.__globals__, name, value.__defaults__)
    return value

  def persistent_load(self, pid):
    # torch 2.x: ("storage", <storage class>, key, location, numel); numel is in elements for
    # typed storages and in bytes for UntypedStorage.
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and (pid[1] in _DTYPE_TAGS or pid[1] == ("dtype", None))
            and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
      raise CheckpointError(f"{self.path}: unexpected persistent id {pid!r}.")
    _, (_, dtype_name), key, _, numel = pid
    if key not in self.storages:
      dtype = _TORCH_DTYPES[dtype_name] if dtype_name else None
      name = f"{self.prefix}data/{key}"
      try:
        info = self.zip.getinfo(name)
      except KeyError:
        raise CheckpointError(f"{self.path}: storage {name} is missing.") from None
      if info.file_size < numel * (dtype.itemsize if dtype else 1):
        raise CheckpointError(f"{self.path}: storage {name} is shorter than its {numel} elements.")
      if info.compress_type == zipfile.ZIP_STORED:
        local = bytearray(30)  # local header: its name and extra lengths place the data
        self.reader.read_into(info.header_offset, memoryview(local))
        sig, *_, n_name, n_extra = struct.unpack("<IHHHHHIIIHH", local)
        if sig != 0x04034B50:
          raise CheckpointError(f"{self.path}: bad zip local header for {name}.")
        reader, base = self.reader, info.header_offset + 30 + n_name + n_extra
      else:
        reader, base = _Reader(self.path, self.zip, name), 0
      self.storages[key] = _Storage(reader, base, dtype, numel, f"{self.path}:{name}")
    return self.storages[key]


def _open_torch_zip(path, subkey, readers):
  zip_file = zipfile.ZipFile(path)
  readers.append(zip_file)
  pkls = [n for n in zip_file.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pkls) != 1:
    raise CheckpointError(f"{path}: a zip, but not a torch.save archive (no <archive>/data.pkl; "
                          "TorchScript and npz files are not read). Convert it to safetensors.")
  prefix = pkls[0][:-len("data.pkl")]
  if prefix + "byteorder" in zip_file.namelist():
    if zip_file.read(prefix + "byteorder").strip() != b"little":
      raise CheckpointError(f"{path}: big-endian torch file; re-save it on a little-endian host.")
  reader = _Reader(path)
  readers.append(reader)
  try:
    top = _Unpickler(zip_file.read(pkls[0]), zip_file, prefix, reader, path).load()
  except Exception as e:  # a malformed pickle fails in many ways; all name the file
    message = str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"
    raise CheckpointError(message if message.startswith(path) else f"{path}: {message}") from e
  has_tensors = lambda d: isinstance(d, dict) and any(isinstance(v, _Tensor) for v in d.values())
  chosen = top
  if subkey is not None:
    if not isinstance(top, dict) or subkey not in top:
      keys = list(top) if isinstance(top, dict) else type(top).__name__
      raise CheckpointError(f"{path}: no top-level entry {subkey!r} (it has {keys}).")
    chosen = top[subkey]
  elif not has_tensors(top) and isinstance(top, dict) and has_tensors(top.get("model")):
    chosen = top["model"]
  if not has_tensors(chosen):
    keys = list(top) if isinstance(top, dict) else type(top).__name__
    raise CheckpointError(f"{path}: holds no dict of tensors where expected (top level: {keys}); "
                          "pass subkey= to pick the entry holding the state dict.")
  entries = {str(k): v.info for k, v in chosen.items() if isinstance(v, _Tensor)}
  skipped = sorted(str(k) for k, v in chosen.items() if not isinstance(v, _Tensor))
  return entries, skipped
