"""The CogVideoX 3D causal VAE decoder in Flax (sampling output), loading diffusers weights."""

from ttt_jax.vae.cogvideox import (CogVideoXDecoder, VAEConfig, decode, latent_windows, load_hf,
                                   num_output_frames)

__all__ = ["CogVideoXDecoder", "VAEConfig", "decode", "latent_windows", "load_hf",
           "num_output_frames"]
