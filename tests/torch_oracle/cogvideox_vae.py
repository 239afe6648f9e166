"""Oracle (runs under torch in .venv-oracle): a tiny random diffusers AutoencoderKLCogVideoX.

  python cogvideox_vae.py OUT_DIR SPEC_JSON

SPEC_JSON keys (each part optional):
  model: {config: AutoencoderKLCogVideoX kwargs, seed, latents: [name, ...]}
    -> OUT_DIR/model/ (config.json + diffusion_pytorch_model.safetensors, `save_pretrained`),
       and for each name, OUT_DIR/{name}.npy ([B, C, T, h, w] float32 latents, written by the
       test) decoded by `vae.decode` (float32, tiling off) -> OUT_DIR/{name}_out.npy
       [B, 3, F, 8h, 8w]. Every parameter is moved off its init (norm weights 1, biases 0).
  cogvideox_5b_param_count: true -> stdout JSON {"decoder_params": n} for the CogVideoX-5b
    config (THUDM/CogVideoX-5b/vae/config.json) built on the meta device.
"""

import json
import pathlib
import sys

import numpy as np
import torch
from diffusers import AutoencoderKLCogVideoX

out_dir, spec = pathlib.Path(sys.argv[1]), json.loads(sys.argv[2])
report = {}
torch.set_num_threads(1)

if "model" in spec:
  m = spec["model"]
  torch.manual_seed(m.get("seed", 0))
  vae = AutoencoderKLCogVideoX(**m["config"]).eval()
  with torch.no_grad():
    for p in vae.parameters():
      p.mul_(1 + 0.1 * torch.randn_like(p)).add_(0.02 * torch.randn_like(p))
  vae.save_pretrained(out_dir / "model", safe_serialization=True)
  for name in m["latents"]:
    z = torch.from_numpy(np.load(out_dir / f"{name}.npy"))
    with torch.no_grad():
      out = vae.decode(z).sample
    np.save(out_dir / f"{name}_out.npy", out.float().numpy())

if spec.get("cogvideox_5b_param_count"):
  with torch.device("meta"):
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 256, 512),
        layers_per_block=3, act_fn="silu", norm_eps=1e-6, norm_num_groups=32,
        temporal_compression_ratio=4, sample_height=480, sample_width=720, scaling_factor=0.7,
        use_quant_conv=False, use_post_quant_conv=False)
  report["decoder_params"] = sum(p.numel() for p in vae.decoder.parameters())
  report["post_quant_conv"] = vae.post_quant_conv is not None

print(json.dumps(report))
