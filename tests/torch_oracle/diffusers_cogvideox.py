"""Oracle (runs under torch in .venv-oracle): a tiny random diffusers CogVideoXTransformer3DModel.

  python diffusers_cogvideox.py OUT_DIR SPEC_JSON

SPEC_JSON: {num_layers, num_heads, head_dim, in_channels, text_dim, time_embed_dim, frames,
height, width, text_length, timesteps: [...], seed}. Writes OUT_DIR/transformer/ (the diffusers
folder: config.json + safetensors, as `save_pretrained` writes it) and OUT_DIR/io.npz with the
inputs and diffusers' float32 output. Rotary tables are made as the CogVideoX pipeline makes
them (`_prepare_rotary_positional_embeddings`), with sample size = the latent size.
"""

import json
import pathlib
import sys

import numpy as np
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

out_dir, spec = pathlib.Path(sys.argv[1]), json.loads(sys.argv[2])
torch.manual_seed(spec["seed"])
model = CogVideoXTransformer3DModel(
    num_attention_heads=spec["num_heads"], attention_head_dim=spec["head_dim"],
    in_channels=spec["in_channels"], out_channels=spec["in_channels"],
    text_embed_dim=spec["text_dim"], time_embed_dim=spec["time_embed_dim"],
    num_layers=spec["num_layers"], sample_frames=4 * (spec["frames"] - 1) + 1,
    sample_height=spec["height"], sample_width=spec["width"], patch_size=2,
    norm_eps=spec.get("norm_eps", 1e-6), use_rotary_positional_embeddings=True).eval()
with torch.no_grad():  # move every tensor off its init (LN weights 1, biases 0, ...)
  for p in model.parameters():
    p.add_(0.1 * torch.randn_like(p))
model.save_pretrained(out_dir / "transformer", safe_serialization=True)

B, T, C, H, W = (len(spec["timesteps"]), spec["frames"], spec["in_channels"], spec["height"],
                 spec["width"])
video = torch.randn(B, T, C, H, W)
text = torch.randn(B, spec["text_length"], spec["text_dim"])
timesteps = torch.tensor(spec["timesteps"], dtype=torch.int64)
gh, gw = H // 2, W // 2
crops = get_resize_crop_region_for_grid((gh, gw), W // 2, H // 2)
rotary = get_3d_rotary_pos_embed(embed_dim=spec["head_dim"], crops_coords=crops,
                                 grid_size=(gh, gw), temporal_size=T, device="cpu")
with torch.no_grad():
  out = model(hidden_states=video, encoder_hidden_states=text, timestep=timesteps,
              image_rotary_emb=rotary, return_dict=False)[0]
np.savez(out_dir / "io.npz", video=video.numpy(), text=text.numpy(),
         timesteps=timesteps.numpy(), out=out.float().numpy())
print(json.dumps({"out_shape": list(out.shape)}))
