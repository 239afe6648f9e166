"""launch/compile_only.py: AOT compile from shapes on cpu-8 (always), TPU and GPU (with extras).

The TPU and GPU tests need the `tpu` / `cuda` extras (compile-only devices, no accelerator);
CI installs neither, so there they skip.
"""

import json
import pathlib
import subprocess
import sys

import pytest

from ttt_jax import aot

ROOT = pathlib.Path(__file__).parents[1]
FIELDS = ("argument_gib", "output_gib", "temp_gib", "generated_code_gib", "alias_gib",
          "total_gib", "params_gib", "mesh_shape", "batch", "compile_s")


def _run(*args, timeout=300):
  cmd = [sys.executable, str(ROOT / "launch" / "compile_only.py"),
         "--config=configs/default.py:preset=tiny,seconds=9", *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _records(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {r["step"]: r for r in map(json.loads, proc.stdout.splitlines())}


def _check(records, topology, devices):
  fwd, train = records["forward"], records["train"]
  for r in (fwd, train):
    assert all(f in r for f in FIELDS), sorted(r)
    assert r["topology"] == topology and r["seconds"] == 9 and r["preset"] == "tiny"
    assert r["mesh_shape"] == [1, devices, 1] and r["batch"] == devices
    assert r["argument_gib"] > 0 and r["temp_gib"] > 0
    parts = r["argument_gib"] + r["output_gib"] - r["alias_gib"] + r["temp_gib"]
    assert r["total_gib"] == pytest.approx(parts + r["generated_code_gib"])
  # The backward pass keeps activations the forward frees: more scratch memory.
  assert train["temp_gib"] > 2 * fwd["temp_gib"]
  # The train step writes the new state over the donated old one: every output but the metrics
  # is aliased. With the tiny preset's `sft` every parameter has two float32 AdamW moments, so
  # the state is three times the parameters (sizes as laid out on the device, so TPU tiling
  # pads them past that).
  assert train["adapter"] == "sft" and "adapter" not in fwd
  assert train["alias_gib"] >= 3 * train["params_gib"] > 0
  assert train["alias_gib"] == pytest.approx(train["output_gib"], rel=0.01)
  assert fwd["alias_gib"] == 0


def test_cpu_topology_forward_and_train(tmp_path):
  out = tmp_path / "memory.jsonl"
  proc = _run("--topology=cpu-8", f"--out={out}", "--steps=forward,train,sample")
  records = _records(proc)
  _check(records, "cpu-8", 8)
  assert len(out.read_text().splitlines()) == 3
  assert "adapter" in proc.stderr  # the table's header
  # The sampler loop for one video: the CFG pair over fsdp, tensor-parallel over the rest; its
  # memory is one guided forward's (the 50 steps are a scan), so below the train step's.
  sample = records["sample"]
  assert sample["mesh_shape"] == [1, 2, 4] and sample["batch"] == 1
  assert 0 < sample["temp_gib"] < records["train"]["temp_gib"]


def test_tpu_topology_without_a_tpu():
  pytest.importorskip("libtpu")
  records = _records(_run("--topology=v5p-8"))  # 4 chips, one device each
  _check(records, "v5p-8", 4)
  assert records["train"]["device_kind"].startswith("TPU")


def test_gpu_topology_without_a_gpu():
  pytest.importorskip("jax_cuda12_plugin")
  fwd = _records(_run("--topology=h100-4x2", "--steps=forward"))["forward"]  # 2 hosts x 4
  assert fwd["device_kind"].startswith("NVIDIA H100") and fwd["mesh_shape"] == [1, 8, 1]
  assert fwd["temp_gib"] > 0 and all(f in fwd for f in FIELDS)


def test_kernels_follow_the_target_platform():
  """Under `use_rules` on a compile-only mesh, kernel choices follow the mesh's devices, not
  the host's: splash attention compiles (no interpret mode) for TPU, the TTT op's
  impl="auto" takes the Pallas kernels for TPU and GPU (the scan on CPU)."""
  import jax
  from configs.default import get_config
  from ttt_jax import sharding
  from ttt_jax.ops import ttt
  rules = get_config("").sharding.rules
  assert sharding.target_platform() == jax.default_backend()
  assert ttt._use_pallas("auto") == (jax.default_backend() in ("gpu", "tpu"))
  checked = 0
  for name, platform in (("v5p-8", "tpu"), ("h100-4x2", "gpu"), ("cpu-8", "cpu")):
    try:
      devices = aot.get_topology(name).devices
    except aot.TopologyError:
      continue  # no libtpu / CUDA plugin here
    with sharding.use_rules(sharding.make_mesh((1, -1, 1), devices), rules):
      assert sharding.target_platform() == platform
      assert ttt._use_pallas("auto") == (platform != "cpu")
      assert sharding.target_device()[1] == devices[0].device_kind
    checked += 1
  assert checked >= 1  # cpu-8: conftest's host devices


@pytest.mark.parametrize("name, want", [
    ("v5p-8", "v5p:2x2x1"), ("v5p-256", "v5p:4x4x8"), ("v5p-512", "v5p:4x8x8"),
    ("v5e-64", "v5e:8x8"), ("v6e-8", "v6e:2x4"), ("v4-32", "v4:2x2x4"), ("v5p:4x4x4", "v5p:4x4x4"),
])
def test_tpu_names(name, want):
  assert aot.tpu_topology_name(name) == want


@pytest.mark.parametrize("name, match", [
    ("v5p-6", "not a power of two"), ("v5p-7", "multiple of 2"), ("tpu-8", "use e.g. v5p-256"),
])
def test_bad_tpu_names(name, match):
  with pytest.raises(aot.TopologyError, match=match):
    aot.tpu_topology_name(name)


def test_unavailable_topology_fails_with_a_message():
  try:
    import jax_cuda12_plugin  # noqa: F401
    pytest.skip("the CUDA plugin is installed, so GPU topologies compile")
  except ImportError:
    pass
  proc = _run("--topology=h100-8x32", timeout=120)
  assert proc.returncode == 1
  assert "jax's CUDA plugin" in proc.stderr and "Traceback" not in proc.stderr


def test_sample_step_needs_a_mesh_that_splits_the_cfg_pair():
  proc = _run("--topology=cpu-8", "--steps=sample", "--config.sharding.mesh_shape=(1,8,1)")
  assert proc.returncode != 0
  assert "batch of 2" in proc.stderr and "Traceback" not in proc.stderr
