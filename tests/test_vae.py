"""The CogVideoX VAE decoder against diffusers' AutoencoderKLCogVideoX (torch, oracle venv).

One oracle run builds a tiny random VAE (every parameter off its init), saves it with
`save_pretrained`, and decodes latents of 7, 4 and 1 frames with `vae.decode` (its windowed
`_decode`: windows [0, 3), [3, 5), [5, 7) with the conv caches carried), and counts the
CogVideoX-5b decoder's parameters on the meta device.
"""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.oracles import rel_err
from ttt_jax.checkpoint.tensor_files import CheckpointError, open_tensors, save_safetensors
from ttt_jax.vae import cogvideox as vae

TINY = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32, 32, 32],
            layers_per_block=1, norm_num_groups=8, temporal_compression_ratio=4,
            scaling_factor=0.7)
LATENTS = {"t7": (2, 7), "t4": (1, 4), "t1": (1, 1)}  # name: (B, T); latents [B, 4, T, 4, 6]


@pytest.fixture(scope="module")
def oracle(run_oracle, tmp_path_factory):
  out = tmp_path_factory.mktemp("vae")
  rng = np.random.default_rng(0)
  latents = {}
  for name, (B, T) in LATENTS.items():
    latents[name] = rng.normal(size=(B, TINY["latent_channels"], T, 4, 6)).astype(np.float32)
    np.save(out / f"{name}.npy", latents[name])
  spec = {"model": {"config": TINY, "seed": 0, "latents": list(LATENTS)},
          "cogvideox_5b_param_count": True}
  report = json.loads(run_oracle("cogvideox_vae.py", out, json.dumps(spec)).strip()
                      .splitlines()[-1])
  return dict(dir=out, report=report, latents=latents,
              out={name: np.load(out / f"{name}_out.npy") for name in LATENTS})


@pytest.fixture(scope="module")
def decoder(oracle):
  return vae.load_hf(oracle["dir"] / "model")


@pytest.mark.parametrize("name", list(LATENTS))
def test_decode_matches_diffusers(oracle, decoder, name):
  z = oracle["latents"][name]  # [B, C, T, h, w], diffusers' layout
  ours = vae.decode(decoder, np.transpose(z, (0, 2, 1, 3, 4)))  # [B, F, H, W, 3]
  ref = np.transpose(oracle["out"][name], (0, 2, 3, 4, 1))  # [B, F, H, W, 3]
  B, T = LATENTS[name]
  assert ours.shape == ref.shape == (B, vae.num_output_frames(T), 32, 48, 3)
  err = rel_err(ours, ref)
  print(f"VAE decode T={T} float32 rel err {err:.2e}")
  assert err <= 1e-5


def test_windowing_matters(oracle, decoder):
  """One monolithic call (GroupNorm over all 7 frames) is far from diffusers' windowed decode,
  so the parity above checks the windows, the carried caches and per-window statistics."""
  z = jnp.transpose(jnp.asarray(oracle["latents"]["t7"]), (0, 2, 3, 4, 1))  # [B, T, h, w, C]
  whole, _ = decoder(z)
  ref = np.transpose(oracle["out"]["t7"], (0, 2, 3, 4, 1))
  assert whole.shape == ref.shape and rel_err(whole, ref) > 1e-3


def test_frame_counts_and_windows():
  assert vae.latent_windows(7) == [(0, 3), (3, 5), (5, 7)]
  assert vae.latent_windows(13) == [(0, 3)] + [(i, i + 2) for i in range(3, 13, 2)]
  assert vae.latent_windows(4) == [(0, 2), (2, 4)] and vae.latent_windows(1) == [(0, 1)]
  for T in (1, 3, 5, 7, 13, 37, 61, 121, 253):  # odd: every CogVideoX length
    assert vae.num_output_frames(T) == 1 + 4 * (T - 1)
  assert vae.num_output_frames(253) == 1009 and vae.num_output_frames(4) == 16  # diffusers' rule


def test_unbatched_and_scaled_input(oracle, decoder):
  """[T, C, h, w] input is one example; scaling_factor divides the latents first."""
  z = np.transpose(oracle["latents"]["t7"][1], (1, 0, 2, 3))  # [T, C, h, w]
  ours = vae.decode(decoder, z * 0.7, scaling_factor=0.7)
  ref = np.transpose(oracle["out"]["t7"][1:], (0, 2, 3, 4, 1))
  assert rel_err(ours, ref) <= 1e-5
  with pytest.raises(ValueError, match="latents"):
    vae.decode(decoder, np.zeros((1, 3, 5, 4, 6), np.float32))  # 5 channels, not 4


def test_one_compile_per_window_shape(oracle, decoder):
  """A longer clip adds no compiles: windows after the first share one shape (and cache)."""
  z = np.transpose(oracle["latents"]["t7"], (0, 2, 1, 3, 4))  # [B, 7, C, h, w]
  vae.decode(decoder, z)
  before = vae._decode_window._cache_size()
  long = np.concatenate([z, z[:, 1:5]], axis=1)  # T = 11: 5 windows
  assert vae.decode(decoder, long).shape[1] == 41
  assert vae._decode_window._cache_size() == before


def test_config(oracle):
  with open(oracle["dir"] / "model" / "config.json") as f:
    hf = json.load(f)
  c = vae.VAEConfig.from_hf_config(hf)
  assert c == vae.VAEConfig(**{**TINY, "block_out_channels": (16, 32, 32, 32)})
  five = vae.VAEConfig.cogvideox_5b()
  assert (five.latent_channels, five.block_out_channels, five.scaling_factor) == (
      16, (128, 256, 256, 512), 0.7)
  with pytest.raises(CheckpointError, match="use_post_quant_conv"):
    vae.VAEConfig.from_hf_config({**hf, "use_post_quant_conv": True})


def test_load_errors_name_the_bad_tensors(oracle, tmp_path):
  folder = oracle["dir"] / "model"
  with open_tensors(folder) as src:
    tensors = {k: v.load() for k, v in src.items()}
  assert any(k.startswith("encoder.") for k in tensors)  # present, and ignored by load_hf
  gone = "decoder.up_blocks.1.resnets.0.norm2.conv_y.conv.weight"
  bad = "decoder.up_blocks.0.upsamplers.0.conv.weight"  # Conv2d [32, 32, 3, 3]
  del tensors[gone]
  tensors[bad] = tensors[bad][:, :-1]
  tensors["decoder.extra.weight"] = np.zeros(3, np.float32)
  save_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", tensors)
  shutil.copy(folder / "config.json", tmp_path / "config.json")
  with pytest.raises(CheckpointError) as info:
    vae.load_hf(tmp_path)
  message = str(info.value)
  assert f"missing {gone} [32, 4, 1, 1, 1]" in message
  assert f"{bad} has shape [32, 31, 3, 3], expected [32, 32, 3, 3]" in message
  assert "unexpected decoder.extra.weight" in message
  (tmp_path / "bare").mkdir()  # weights without config.json
  shutil.copy(folder / "diffusion_pytorch_model.safetensors", tmp_path / "bare")
  with pytest.raises(CheckpointError, match="config.json"):
    vae.load_hf(tmp_path / "bare" / "diffusion_pytorch_model.safetensors")


def test_cogvideox_5b_parameter_count(oracle):
  abstract = nnx.eval_shape(lambda: vae.CogVideoXDecoder(vae.VAEConfig.cogvideox_5b(),
                                                         rngs=nnx.Rngs(0)))
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert oracle["report"]["post_quant_conv"] is False
  assert count == oracle["report"]["decoder_params"] == 123_368_451
  print(f"CogVideoX-5b VAE decoder parameters: {count:,}")


def test_bfloat16_close(oracle):
  decoder = vae.load_hf(oracle["dir"] / "model", dtype=jnp.bfloat16)
  z = np.transpose(oracle["latents"]["t4"], (0, 2, 1, 3, 4))
  ours = vae.decode(decoder, z)
  err = rel_err(ours, np.transpose(oracle["out"]["t4"], (0, 2, 3, 4, 1)))
  print(f"VAE decode bfloat16 rel err {err:.2e}")
  assert ours.dtype == np.float32 and err <= 3e-2
