"""Checkpoint import (b): ttt-video-dit state dicts (upstream names, spec 1.5 / 7) -> DiT, and
the orbax save/restore round trip."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.default import get_config
from tests.conftest import ROOT
from ttt_jax.checkpoint import CheckpointError, convert, save_safetensors
from ttt_jax.checkpoint.names import diffusers_to_upstream


def _params(model):
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def source():
  """A 9 s tiny model with O(1) random parameters and its upstream state dict."""
  config = get_config("seconds=9")
  model = convert.new_model(config, seed=1)
  rng = np.random.default_rng(0)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    var[...] = var[...] + jnp.asarray(0.1 * rng.normal(size=var[...].shape), var[...].dtype)
  return config, model, convert.state_dict(model, prefix="dit.")


def _inputs(config, batch=1):
  m, s = config.model, config.sequence
  rng = np.random.default_rng(1)
  video = rng.normal(size=(batch, s.num_frames, m.in_channels, m.latent_height,
                           m.latent_width)).astype(np.float32)
  text = rng.normal(size=(batch, s.num_chunks, s.text_length, m.text_dim)).astype(np.float32)
  return video, text, jnp.full((batch,), 321.0)


def test_state_dict_names_are_upstreams(source):
  _, _, sd = source
  assert "dit.layers.1.seq_modeling_block.ssm.ttt.W1" in sd
  assert "dit.layers.0.pre_seq_adaLN_modulation.1.weight" in sd
  assert "dit.layers.0.seq_modeling_block.forward_ssm_gating_video.gating_alpha" in sd
  assert sd["dit.patch_embedding.vid_proj.weight"].shape == (64, 12, 2, 2)
  assert sd["dit.time_embed.0.weight"].shape == (32, 64)


def test_safetensors_round_trip(source, tmp_path):
  config, model, sd = source
  save_safetensors(tmp_path / "m.safetensors", sd)
  loaded = convert.import_upstream(tmp_path / "m.safetensors", config, seed=7)
  want, got = _params(model), _params(loaded)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))
  args = _inputs(config)
  np.testing.assert_array_equal(np.asarray(loaded(*args)), np.asarray(model(*args)))


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_torch_zip_checkpoint(source, tmp_path, run_oracle, dtype):
  config, model, sd = source
  save_safetensors(tmp_path / "m.safetensors", sd)
  run_oracle("resave_torch.py", tmp_path / "m.safetensors", tmp_path / "m.pt", dtype)
  loaded = convert.import_upstream(tmp_path / "m.pt", config)
  want, got = _params(model), _params(loaded)
  for k in want:
    if dtype == "f32":
      np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))
    else:  # bf16 storage: round to nearest bf16
      np.testing.assert_allclose(got[k], want[k], rtol=2 ** -8, atol=1e-30, err_msg=str(k))


def test_bad_checkpoints_are_listed_and_nothing_is_loaded(source, tmp_path):
  config, _, sd = source
  bad = dict(sd)
  del bad["dit.layers.1.mlp.layer2.bias"]
  bad["dit.final_layer.linear.weight"] = bad["dit.final_layer.linear.weight"][:, :5]
  bad["dit.layers.0.seq_modeling_block.ssm.ttt.b1"] = np.zeros((4, 1, 64), np.int64)
  bad["dit.layers.0.lora_A"] = np.zeros(2, np.float32)
  save_safetensors(tmp_path / "bad.safetensors", bad)
  with pytest.raises(CheckpointError) as e:
    convert.import_upstream(tmp_path / "bad.safetensors", config)
  msg = str(e.value)
  assert "4 problem(s)" in msg
  assert "missing: dit.layers.1.mlp.layer2.bias" in msg
  assert "wrong shape: dit.final_layer.linear.weight is (48, 5), expected (48, 64)" in msg
  assert "wrong dtype: dit.layers.0.seq_modeling_block.ssm.ttt.b1 is int64" in msg
  assert "unexpected: dit.layers.0.lora_A" in msg

  # The CLI reports it and writes nothing.
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "launch" / "import_checkpoint.py"),
       f"--config={ROOT / 'configs' / 'default.py'}:seconds=9", "--source=upstream",
       f"--input={tmp_path / 'bad.safetensors'}", f"--output={out}"],
      capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 1 and "missing: dit.layers.1.mlp.layer2.bias" in proc.stderr
  assert not out.exists()


def test_cli_import_then_restore(source, tmp_path):
  config, model, sd = source
  save_safetensors(tmp_path / "m.safetensors", sd)
  out = tmp_path / "ckpt"
  subprocess.run(
      [sys.executable, str(ROOT / "launch" / "import_checkpoint.py"),
       f"--config={ROOT / 'configs' / 'default.py'}:seconds=9", "--source=upstream",
       f"--input={tmp_path / 'm.safetensors'}", f"--output={out}"],
      capture_output=True, text=True, cwd=ROOT, check=True)
  restored = convert.restore(out)
  want, got = _params(model), _params(restored)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))
  with pytest.raises(CheckpointError, match="exists; choose a new output directory"):
    convert.save(restored, out, config)
  with pytest.raises(CheckpointError, match="is not a ttt-jax checkpoint"):
    convert.restore(tmp_path)


def test_5b_names_cover_diffusers_and_count_matches_spec():
  """Spec 1.5 / 7.1: 1,024 CogVideoX tensors map one-to-one; TTT-MLP adds 39,521,328 per layer."""
  config = get_config("preset=5b")
  abstract = nnx.eval_shape(lambda: convert.new_model(config))
  params = {p: v for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
  total = sum(int(np.prod(v.shape)) for v in params.values())
  assert total == 5_570_283_072 + 42 * 39_521_328
  from ttt_jax.checkpoint import names
  entries = names.entries({tuple(map(str, p)): v for p, v in params.items()}, patch_size=2)
  upstream = {n for e in entries for n in e.names}
  cogvideo = {n for n in upstream if ".ssm." not in n and "gating" not in n}
  assert len(cogvideo) == 1024
  diffusers_keys = [f"transformer_blocks.{i}.{k}" for i in range(42) for k in (
      "norm1.linear.weight", "attn1.to_out.0.bias", "ff.net.0.proj.weight", "attn1.norm_k.bias")]
  assert all(diffusers_to_upstream(k) in cogvideo for k in diffusers_keys)
