"""The CogVideoX 3D causal VAE decoder in Flax (sampling output), loading diffusers weights."""
