"""ttt_jax.checkpoint.tensor_files: lazy safetensors / torch.save readers against torch itself.

One oracle run (tests/torch_oracle/save_tensors.py) writes the torch and safetensors files and
their expected values, and reads back a file written by `save_safetensors`.
"""

import json
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from ttt_jax.checkpoint import CheckpointError, open_tensors, save_safetensors
from ttt_jax.checkpoint import tensor_files

TORCH_DTYPES = {"torch.float32": np.float32, "torch.float16": np.float16,
                "torch.bfloat16": ml_dtypes.bfloat16,
                "torch.float8_e4m3fn": ml_dtypes.float8_e4m3fn, "torch.int64": np.int64,
                "torch.uint16": np.uint16, "torch.bool": np.bool_, "torch.uint8": np.uint8}


def ours_to_save():
  rng = np.random.default_rng(0)
  bf16 = rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16)
  bf16[0, :4] = [np.nan, np.inf, -np.inf, -0.0]
  return {"bf16": bf16, "f32": rng.standard_normal((4, 3), dtype=np.float32),
          "f32_t": rng.standard_normal((3, 4), dtype=np.float32).T,  # non-contiguous input
          "f16_be": rng.standard_normal(5).astype(">f2"), "i64": np.arange(-3, 3) << 40,
          "mask": np.array([True, False]), "u8": np.arange(4, dtype=np.uint8),
          "scalar": np.float32(1.5), "empty": np.zeros((0, 2), np.float32)}


@pytest.fixture(scope="module")
def files(run_oracle, tmp_path_factory):
  out = tmp_path_factory.mktemp("oracle")
  save_safetensors(out / "ours.safetensors", ours_to_save(), metadata={"by": "ttt_jax"})
  run_oracle("save_tensors.py", out, out / "ours.safetensors")
  meta = json.loads((out / "meta.json").read_text())
  with np.load(out / "expected.npz") as npz:
    meta["expected"] = dict(npz)
  return out, meta


def assert_same(array, expected, torch_dtype, shape):
  assert array.dtype == np.dtype(TORCH_DTYPES[torch_dtype]) and array.shape == tuple(shape)
  assert array.flags.c_contiguous
  if expected.dtype == np.float32:  # bitwise: NaN, -0.0 and bf16 rounding all count
    np.testing.assert_array_equal(array.astype(np.float32).view(np.uint32),
                                  expected.view(np.uint32))
  else:
    np.testing.assert_array_equal(array.astype(expected.dtype), expected)


def check_all(source, meta, names):
  assert list(source) == sorted(names)
  for name in names:
    torch_dtype, shape = meta["tensors"][name]
    info = source[name]
    assert info.shape == tuple(shape) and info.dtype == TORCH_DTYPES[torch_dtype], name
    assert_same(info.load(), meta["expected"][name], torch_dtype, shape)


@pytest.mark.parametrize("name,subkey", [("sd.pt", None), ("nested.pt", None),
                                         ("nested.pt", "model"), ("single.safetensors", None),
                                         ("sharded", None),
                                         ("sharded/diffusion_pytorch_model.safetensors.index.json",
                                          None)])
def test_matches_torch(files, name, subkey):
  out, meta = files
  names = meta["dense"] if "safetensors" in name or name == "sharded" else meta["tensors"]
  with open_tensors(out / name, subkey=subkey) as source:
    check_all(source, meta, names)
    assert source.skipped == ()


def test_sharded_folder_without_index(files, tmp_path):
  out, meta = files
  for f in (out / "sharded").glob("*.safetensors"):
    (tmp_path / f.name).write_bytes(f.read_bytes())
  with open_tensors(tmp_path) as source:
    check_all(source, meta, meta["dense"])


def test_compressed_torch_zip(files, tmp_path):
  # torch writes stored members; a re-zipped file has deflated ones, read through zipfile.
  out, meta = files
  path = tmp_path / "deflated.pt"
  with zipfile.ZipFile(out / "sd.pt") as src, zipfile.ZipFile(path, "w") as dst:
    for item in src.infolist():
      dst.writestr(item.filename, src.read(item), compress_type=zipfile.ZIP_DEFLATED)
  with open_tensors(path) as source:
    check_all(source, meta, meta["tensors"])


def test_reads_only_what_it_needs(files, monkeypatch):
  out, _ = files
  reads = []
  real = tensor_files._Reader.read_into
  monkeypatch.setattr(tensor_files._Reader, "read_into",
                      lambda self, pos, buf: (reads.append(buf.nbytes), real(self, pos, buf)))
  with open_tensors(out / "sd.pt") as source:
    assert set(reads) == {30}  # zip local headers only, no storage bytes
    reads.clear()
    source["slice"].load()  # base[2:5, 1:7] of a 6x8 f32: elements 17..38 of 48
    assert reads == [22 * 4]
    reads.clear()
    source["shared_b"].load()
    assert reads == [6 * 4]
  reads.clear()
  with open_tensors(out / "single.safetensors") as source:
    assert len(reads) == 2  # header length, header
    reads.clear()
    source["f32"].load()
    assert reads == [3 * 5 * 4]


def test_dict_selection(files):
  out, _ = files
  with open_tensors(out / "mixed.pt") as source:
    assert list(source) == ["w"] and source.skipped == ("name", "step")
    np.testing.assert_array_equal(source["w"].load(), np.ones(2, np.float32))
  with pytest.raises(CheckpointError, match="no top-level entry 'ema'.*model"):
    open_tensors(out / "nested.pt", subkey="ema")
  with pytest.raises(CheckpointError, match="holds no dict of tensors.*subkey="):
    open_tensors(out / "nested.pt", subkey="optimizer")  # {"state": ..., "param_groups": ...}
  with pytest.raises(CheckpointError, match="subkey='model' applies only to torch"):
    open_tensors(out / "single.safetensors", subkey="model")


def test_closed_source_refuses_loads(files):
  out, _ = files
  for name in ("sd.pt", "single.safetensors"):
    with open_tensors(out / name) as source:
      info = source["f32"]
    with pytest.raises(CheckpointError, match="closed"):
      info.load()


def test_legacy_and_unknown_files_are_refused(files, tmp_path):
  out, _ = files
  with pytest.raises(CheckpointError, match=r"legacy.pt: a legacy .*_use_new_zipfile"):
    open_tensors(out / "legacy.pt")
  with pytest.raises(CheckpointError, match=r"expected.npz: a zip, but not a torch.save"):
    open_tensors(out / "expected.npz")
  with pytest.raises(CheckpointError, match="nothing-here: no such file"):
    open_tensors(tmp_path / "nothing-here")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="empty: a folder with no"):
    open_tensors(tmp_path / "empty")


class Payload:
  def __init__(self, func, arg):
    self.func, self.arg = func, arg

  def __reduce__(self):
    return self.func, (self.arg,)


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "nested"])
def test_malicious_pickle_is_refused(tmp_path, kind):
  marker = tmp_path / "pwned"
  payload = (Payload(os.system, f"touch {marker}") if kind == "os.system" else
             Payload(eval, f"open({str(marker)!r}, 'w').close()"))
  data = pickle.dumps({"w": payload} if kind == "nested" else payload, protocol=2)
  path = tmp_path / "evil.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("evil/data.pkl", data)
    z.writestr("evil/byteorder", "little")
  with pytest.raises(CheckpointError, match=r"evil.pt: refuses to unpickle (posix.system|builtins"
                                            r".eval)"):
    open_tensors(path)
  assert not marker.exists()
  pickle.loads(data)  # the payload is live: plain pickle runs it
  assert marker.exists()


def test_forged_tensor_records_are_refused(tmp_path):
  # A garbage pickle; allowed globals with wrong arguments (a "storage" that is not a persistent
  # storage record); a view running past its storage (caught at load, where it is read).
  def zip_with(pkl, storage=b""):
    path = tmp_path / "forged.pt"
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("a/data.pkl", pkl)
      z.writestr("a/data/0", storage)
    return path

  with pytest.raises(CheckpointError, match="forged.pt: UnpicklingError"):
    open_tensors(zip_with(b"\x80\x02garbage"))
  rebuild = b"ctorch._utils\n_rebuild_tensor_v2\n"
  not_storage = (b"\x80\x02}X\x01\x00\x00\x00w" + rebuild + b"(X\x03\x00\x00\x00abcK\x00K\x01"
                 b"\x85K\x01\x85\x89NtR.")
  with pytest.raises(CheckpointError, match="forged.pt: bad tensor record"):
    open_tensors(zip_with(not_storage))
  storage = (b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00"
             b"\x00cpuK\x02tQ")
  too_long = (b"\x80\x02}X\x01\x00\x00\x00w" + rebuild + b"(" + storage + b"K\x01K\x02\x85K\x01"
              b"\x85\x89NtRs.")
  with open_tensors(zip_with(too_long, np.ones(2, np.float32).tobytes())) as source:
    with pytest.raises(CheckpointError, match="outside its storage of 2 elements"):
      source["w"].load()


def test_save_safetensors_round_trip_and_torch_reads_it(files):
  out, _ = files
  want = ours_to_save()
  with open_tensors(out / "ours.safetensors") as source:
    assert list(source) == sorted(want)
    for name, value in want.items():
      got = source[name].load()
      assert got.dtype == value.dtype.newbyteorder("=") and got.shape == value.shape
      assert got.tobytes() == np.array(value, got.dtype, order="C").tobytes(), name
  torch_meta = json.loads((out / "ours.json").read_text())
  with np.load(out / "ours.npz") as torch_read:
    assert sorted(torch_read) == sorted(want)
    for name, value in want.items():
      torch_dtype, shape = torch_meta[name]
      native = np.array(value, value.dtype.newbyteorder("="), order="C")
      assert_same(native, torch_read[name], torch_dtype, shape)


def test_save_safetensors_is_atomic(tmp_path):
  path = tmp_path / "w.safetensors"
  save_safetensors(path, {"a": np.ones(3, np.float32)})
  before = path.read_bytes()

  class Boom:
    dtype, shape = np.dtype(np.float32), (2,)

    def __array__(self, *args, **kwargs):
      raise RuntimeError("device lost")

  with pytest.raises(RuntimeError, match="device lost"):
    save_safetensors(path, {"a": np.zeros(3, np.float32), "b": Boom()})
  assert path.read_bytes() == before and os.listdir(tmp_path) == ["w.safetensors"]
  with pytest.raises(CheckpointError, match="no dtype for 'c'"):
    save_safetensors(path, {"c": np.zeros(2, np.complex64)})
  assert path.read_bytes() == before and os.listdir(tmp_path) == ["w.safetensors"]


def corrupt(path, how):
  raw = path.read_bytes()
  (n,) = struct.unpack("<Q", raw[:8])
  header = json.loads(raw[8:8 + n])
  if how == "truncated":
    return raw[:-4]
  if how == "header_too_long":
    return struct.pack("<Q", len(raw)) + raw[8:]
  if how == "not_json":
    return raw[:8] + b"[" + raw[9:]
  if how == "bad_dtype":
    header["b"]["dtype"] = "F128"
  if how == "offsets_vs_shape":
    header["b"]["shape"] = [3, 3]
  if how == "negative":
    header["b"]["data_offsets"] = [-4, 8]
  blob = json.dumps(header).encode()
  return struct.pack("<Q", len(blob)) + blob + raw[8 + n:]


@pytest.mark.parametrize("how,message", [
    ("truncated", r"tensor 'b' .* past the 20 data bytes"),
    ("header_too_long", "header length .* exceeds the file"),
    ("not_json", "the safetensors header is not a JSON object"),
    ("bad_dtype", "bad header entry for 'b'"),
    ("offsets_vs_shape", r"tensor 'b' \(F32 \[3, 3\]\) has data_offsets \[8, 24\]"),
    ("negative", r"tensor 'b' .* data_offsets \[-4, 8\]"),
])
def test_bad_safetensors(tmp_path, how, message):
  good = tmp_path / "good.safetensors"
  save_safetensors(good, {"a": np.ones(2, np.float32), "b": np.arange(4, dtype=np.float32)})
  with open_tensors(good) as source:  # the uncorrupted file reads fine
    np.testing.assert_array_equal(source["b"].load(), np.arange(4, dtype=np.float32))
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(corrupt(good, how))
  with pytest.raises(CheckpointError, match="/bad.safetensors: " + message):
    open_tensors(bad)


def test_bad_folders(tmp_path):
  save_safetensors(tmp_path / "a.safetensors", {"x": np.ones(2, np.float32)})
  save_safetensors(tmp_path / "a.fp16.safetensors", {"x": np.ones(2, np.float16)})
  with pytest.raises(CheckpointError, match="'x' is in both a.fp16.safetensors and a.saf"):
    open_tensors(tmp_path)
  index = tmp_path / "m.safetensors.index.json"
  index.write_text(json.dumps({"weight_map": {"x": "a.safetensors", "y": "a.safetensors"}}))
  with pytest.raises(CheckpointError, match="'y' is mapped to a.safetensors, which lacks it"):
    open_tensors(tmp_path)
  index.write_text(json.dumps({"weight_map": {"x": "../a.safetensors"}}))
  with pytest.raises(CheckpointError, match="shard '../a.safetensors' is not a file in"):
    open_tensors(tmp_path)
  index.write_text(json.dumps({"weight_map": {"x": "a.fp16.safetensors"}}))
  with open_tensors(tmp_path) as source:  # the index picks the variant
    assert source["x"].dtype == np.float16
