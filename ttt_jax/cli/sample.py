"""Samples videos from a storyboard with a trained model (spec 4).

  python launch/sample.py --workdir=runs/tiny/9s --storyboard=examples/storyboard-9s.json \
      --output=samples/tiny --contact_sheet
  python launch/sample.py --checkpoint=ckpt/5b --config=configs/default.py:preset=5b \
      --storyboard=story.jsonl --video_index=all --output=samples/5b

  python launch/sample.py --checkpoint=ckpt/5b --config=configs/default.py:preset=5b \
      --t5=CogVideoX-5b/text_encoder --tokenizer=CogVideoX-5b/tokenizer \
      --vae=CogVideoX-5b/vae --storyboard=story.json --output=samples/5b

--workdir reads a training run's config.json and its latest parameters; --checkpoint (with
--config) reads an imported checkpoint or a workdir's checkpoints under the given config. The
duration follows from each video's number of segments. Writes `<output>/latents_<i>.npy` and
`video_<i>.mp4` (+ `video_<i>.png` with --contact_sheet). The tiny presets use the generated
data's text embedder and space-to-depth codec; the others need --t5 and --tokenizer (the Flax
T5 v1.1 encoder, HF safetensors + spiece.model) and --vae (the Flax CogVideoX VAE decoder,
diffusers weights) for the video; without --vae they write the latents only.
"""

import json
import pathlib
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py",
                                          "Model config (with --checkpoint).")
_WORKDIR = flags.DEFINE_string("workdir", "", "Training run folder (config.json, checkpoints).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "Checkpoint folder (with --config).")
_STORYBOARD = flags.DEFINE_string("storyboard", "examples/storyboard-9s.json",
                                  "Storyboard .json / .jsonl (ttt_jax.sampling.storyboard).")
_VIDEO_INDEX = flags.DEFINE_string("video_index", "0", "Video of the storyboard, or 'all'.")
_OUTPUT = flags.DEFINE_string("output", "samples", "Output folder.")
_SEED = flags.DEFINE_integer("seed", 42, "Noise seed (video i uses seed + i).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 50, "Denoising steps.")
_SAMPLER = flags.DEFINE_enum("sampler", "dpmpp_2m_sde", ["dpmpp_2m_sde", "ddim"], "Sampler.")
_CFG = flags.DEFINE_enum("cfg", "literal", ["literal", "smooth"],
                         "Dynamic CFG schedule: upstream's t-based one or the smooth ramp.")
_CFG_SCALE = flags.DEFINE_float("cfg_scale", 6.0, "Dynamic CFG scale.")
_CONTACT_SHEET = flags.DEFINE_bool("contact_sheet", False, "Also write a PNG contact sheet.")
_T5 = flags.DEFINE_string("t5", "", "T5 encoder folder (HF config.json + safetensors).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "T5 tokenizer: spiece.model or its folder.")
_VAE = flags.DEFINE_string("vae", "", "CogVideoX VAE folder (diffusers config.json + weights).")
_VAE_SCALE = flags.DEFINE_float("vae_scale_factor", 1.0, "Latents are divided by it before "
                                "decoding: 1.0 for ttt-video models, 0.7 for CogVideoX-5B.")
_MESH_SHAPE = flags.DEFINE_list("mesh_shape", [], "Mesh (data,fsdp,tensor) for sampling; "
                                "default: one device, or the config's on several.")


def _load_config():
  import ml_collections  # pylint: disable=g-import-not-at-top
  if _WORKDIR.value:
    path = pathlib.Path(_WORKDIR.value) / "config.json"
    if not path.exists():
      raise FileNotFoundError(f"--workdir={_WORKDIR.value}: no config.json (not a training run "
                              "folder); use --checkpoint with --config instead.")
    return ml_collections.ConfigDict(json.loads(path.read_text())), _WORKDIR.value
  if not _CHECKPOINT.value:
    raise ValueError("give --workdir=<training run> or --checkpoint=<folder> with --config.")
  return _CONFIG.value, _CHECKPOINT.value


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from ttt_jax import sharding  # pylint: disable=g-import-not-at-top
  from ttt_jax.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from ttt_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from ttt_jax.sampling import generate, storyboard, video  # pylint: disable=g-import-not-at-top
  from ttt_jax.train import checkpoints, step  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.WARNING)  # orbax logs every read at INFO
  try:
    config, source = _load_config()
    videos = storyboard.load(_STORYBOARD.value)
    if _VIDEO_INDEX.value == "all":
      indices = range(len(videos))
    else:
      try:
        indices = [int(_VIDEO_INDEX.value)]
      except ValueError as e:
        raise ValueError(f"--video_index={_VIDEO_INDEX.value!r}: use an integer or 'all'.") from e
      if not 0 <= indices[0] < len(videos):
        raise ValueError(f"--video_index={indices[0]}: {_STORYBOARD.value} holds {len(videos)} "
                         f"videos (0..{len(videos) - 1}).")
    mesh = None
    if _MESH_SHAPE.value or jax.device_count() > 1:
      shape = tuple(int(v) for v in _MESH_SHAPE.value) or tuple(config.sharding.mesh_shape)
      mesh = sharding.make_mesh(shape, num_heads=config.model.num_heads,
                                model_dim=config.model.model_dim)
    else:
      mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    graphdef, abstract = step.sharded_abstract_params(config, mesh)
    params = checkpoints.load_params(source, abstract)
    tiny = config.preset == "tiny"  # the generated data's codec and text embedder
    output = pathlib.Path(_OUTPUT.value)
    output.mkdir(parents=True, exist_ok=True)
    text_encoder = None if tiny else _text_encoder(config)
    decoder = None if tiny else _vae()
    if decoder is None and not tiny:
      print("sample: no --vae given; writing latents only.", file=sys.stderr)
    for i in indices:
      start = time.perf_counter()
      try:
        latents = generate.generate(
            config, params, graphdef, videos[i], seed=_SEED.value + i,
            num_steps=_NUM_STEPS.value, text_encoder=text_encoder,
            sampler=_SAMPLER.value, cfg_mode=_CFG.value, cfg_scale=_CFG_SCALE.value, mesh=mesh)
      except storyboard.StoryboardError as e:
        raise storyboard.StoryboardError(f"{_STORYBOARD.value}: video {i}, {e}") from e
      np.save(output / f"latents_{i}.npy", latents)
      written = [output / f"latents_{i}.npy"]
      if tiny or decoder is not None:
        if tiny:
          frames = video.decode_tiny(latents, config)
        else:
          from ttt_jax import vae  # pylint: disable=g-import-not-at-top
          frames = vae.decode(decoder, latents, scaling_factor=_VAE_SCALE.value)[0]
        written.append(video.write_mp4(frames, output / f"video_{i}.mp4"))
        if _CONTACT_SHEET.value:
          written.append(video.contact_sheet(frames, output / f"video_{i}.png"))
      print(f"video {i}: {storyboard.seconds_of(videos[i])} s, latents {latents.shape}, "
            f"{time.perf_counter() - start:.1f} s -> {', '.join(map(str, written))}")
  except (storyboard.StoryboardError, ConfigError, CheckpointError, sharding.MeshError,
          FileNotFoundError, ValueError) as e:
    print(f"sample: {e}", file=sys.stderr)
    sys.exit(1)


def _text_encoder(config):
  """The Flax T5 encoder + tokenizer of --t5 / --tokenizer (real presets)."""
  if not (_T5.value and _TOKENIZER.value):
    raise ValueError(f"preset={config.preset!r} needs the T5 text encoder: give --t5=<folder with "
                     "config.json + safetensors> and --tokenizer=<spiece.model or its folder>.")
  from ttt_jax.text import TextEncoder  # pylint: disable=g-import-not-at-top
  encoder = TextEncoder.load(_T5.value, _TOKENIZER.value)
  if encoder.text_dim != config.model.text_dim:
    raise ValueError(f"--t5={_T5.value} gives {encoder.text_dim}-wide embeddings but "
                     f"model.text_dim={config.model.text_dim}.")
  return encoder


def _vae():
  """The Flax CogVideoX VAE decoder of --vae, or None."""
  if not _VAE.value:
    return None
  from ttt_jax import vae  # pylint: disable=g-import-not-at-top
  return vae.load_hf(_VAE.value)


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
