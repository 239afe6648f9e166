"""The DiT with TTT gates at 0 on one 3 s segment equals diffusers' CogVideoX (spec 7.3-7.4).

A tiny random `diffusers.CogVideoXTransformer3DModel` (torch, in the oracle venv) is saved with
`save_pretrained`, imported with `import_diffusers`, and run on the same inputs.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.default import get_config
from tests.oracles import rel_err
from ttt_jax.checkpoint import convert

SPEC = dict(num_layers=2, num_heads=4, head_dim=16, in_channels=4, text_dim=32,
            time_embed_dim=32, frames=13, height=4, width=6, text_length=18, seed=0,
            timesteps=[0, 37, 500, 999])


def tiny_config(variant="ttt_mlp", **overrides):
  config = get_config(f"seconds=3,variant={variant}")
  m = config.model
  m.model_dim, m.num_heads, m.num_layers = SPEC["num_heads"] * SPEC["head_dim"], SPEC[
      "num_heads"], SPEC["num_layers"]
  m.text_dim, m.time_embed_dim, m.in_channels = SPEC["text_dim"], SPEC["time_embed_dim"], SPEC[
      "in_channels"]
  m.latent_height, m.latent_width = SPEC["height"], SPEC["width"]
  config.sequence.text_length = SPEC["text_length"]
  m.update(overrides)
  return config


@pytest.fixture(scope="module")
def diffusers_model(run_oracle, tmp_path_factory):
  out = tmp_path_factory.mktemp("diffusers")
  run_oracle("diffusers_cogvideox.py", out, json.dumps(SPEC))
  return out, dict(np.load(out / "io.npz"))


def _zero_gates(model):
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[-1] == "gating_alpha":
      var[...] = jnp.zeros_like(var[...])


@pytest.mark.parametrize("variant", ["ttt_mlp", "ttt_linear", "local_attention"])
def test_matches_diffusers_with_gates_at_zero(diffusers_model, variant):
  folder, io = diffusers_model
  model = convert.import_diffusers(folder / "transformer", tiny_config(variant))
  _zero_gates(model)
  out = jax.jit(lambda m, *a: m(*a))(model, io["video"], io["text"][:, None],
                                      jnp.asarray(io["timesteps"]))
  err = rel_err(np.asarray(out), io["out"])
  print(f"{variant}: rel err vs diffusers {err:.2e}")
  assert err <= 1e-4
  # Sensitivity: the same weights with the gates at their init (0.1) must differ.
  if variant != "local_attention":
    model = convert.import_diffusers(folder / "transformer", tiny_config(variant))
    out = model(io["video"], io["text"][:, None], jnp.asarray(io["timesteps"]))
    assert rel_err(np.asarray(out), io["out"]) > 1e-3


def test_bf16_within_bf16_tolerance(diffusers_model):
  folder, io = diffusers_model
  model = convert.import_diffusers(folder / "transformer", tiny_config(dtype="bfloat16"))
  _zero_gates(model)
  out = model(io["video"], io["text"][:, None], jnp.asarray(io["timesteps"]))
  err = rel_err(np.asarray(out), io["out"])
  print(f"bfloat16: rel err vs diffusers (float32) {err:.2e}")
  assert err <= 3e-2


def test_diffusers_import_lists_bad_tensors(diffusers_model, tmp_path):
  from ttt_jax.checkpoint import open_tensors, save_safetensors
  folder, _ = diffusers_model
  with open_tensors(folder / "transformer") as src:
    tensors = {k: v.load() for k, v in src.items()}
  tensors.pop("transformer_blocks.1.attn1.to_q.weight")
  tensors["proj_out.bias"] = tensors["proj_out.bias"][:3]
  tensors["transformer_blocks.0.norm1.norm.weight"] = np.zeros(64, np.int32)
  tensors["pos_embedding"] = np.zeros(3, np.float32)
  save_safetensors(tmp_path / "bad.safetensors", tensors)
  with pytest.raises(convert.CheckpointError) as e:
    convert.import_diffusers(tmp_path / "bad.safetensors", tiny_config())
  msg = str(e.value)
  for part in ("missing: layers.1.seq_modeling_block.q.weight", "wrong shape: proj_out.bias",
               "wrong dtype: transformer_blocks.0.norm1.norm.weight", "unexpected: pos_embedding"):
    assert part in msg
