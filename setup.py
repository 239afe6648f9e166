"""ttt-jax: One-Minute Video Generation with Test-Time Training, in JAX."""

from setuptools import setup

setup(
    name="ttt-jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of One-Minute Video Generation with Test-Time Training",
    packages=["ttt_jax", "ttt_jax.ops", "ttt_jax.nn", "ttt_jax.checkpoint", "ttt_jax.data",
              "ttt_jax.train", "ttt_jax.sampling", "ttt_jax.text",
              "ttt_jax.vae", "ttt_jax.cli", "configs",
              "pallas_kernels", "pallas_kernels.ttt"],
    python_requires=">=3.12",
    install_requires=[
        "jax>=0.11.2",
        "flax>=0.12.9",
        "ml-collections>=1.1",
        "absl-py",
        "numpy",
        "ml_dtypes",
        "orbax-checkpoint",
        "optax",
        "grain",
        "tensorstore",
        "tqdm",
        "tensorboardX",  # TensorBoard event files without TensorFlow
        "safetensors",
        "imageio",
        "imageio-ffmpeg",  # mp4 output; ships its own ffmpeg binary
        "sentencepiece",  # the T5 tokenizer (no transformers at run time)
    ],
    entry_points={"console_scripts": ["ttt-jax-train=ttt_jax.cli.train:run",
                                      "ttt-jax-sample=ttt_jax.cli.sample:run"]},
    extras_require={
        "test": ["pytest>=8", "pytest-xdist"],
        # PyTorch oracles for parity tests only; never imported by the library.
        "oracle": ["torch==2.13.0", "diffusers==0.42.1", "transformers==5.24.0", "safetensors"],
        # Compile-only TPU / GPU devices for launch/compile_only.py (no accelerator needed), and
        # the runtimes on TPU VMs / GPU hosts.
        "tpu": ["jax[tpu]"],
        "cuda": ["jax[cuda12]"],
    },
)
