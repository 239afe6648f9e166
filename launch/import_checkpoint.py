"""Converts a PyTorch checkpoint into a ttt-jax (orbax) checkpoint.

  python launch/import_checkpoint.py --config=configs/default.py:preset=5b \
      --source=diffusers --input=CogVideoX-5b/transformer --output=ckpt/stage0
  python launch/import_checkpoint.py --config=configs/default.py:preset=5b,seconds=9 \
      --source=upstream --input=ttt-video-dit/model.safetensors --output=ckpt/9s

--source=diffusers: a diffusers CogVideoX transformer folder (config.json + safetensors); the
TTT parameters and gates are initialised (seeded by --seed). --source=upstream: a ttt-video-dit
state dict as safetensors or a torch.save zip (read without torch, no code unpickled).
Nothing is written unless every tensor matches the model.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from ttt_jax.checkpoint import CheckpointError, convert

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Model config.")
_SOURCE = flags.DEFINE_enum("source", None, ["diffusers", "upstream"], "Checkpoint kind.")
_INPUT = flags.DEFINE_string("input", None, "Checkpoint file or folder to read.")
_OUTPUT = flags.DEFINE_string("output", None, "New directory for the orbax checkpoint.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of parameters the source does not hold.")
flags.mark_flags_as_required(["source", "input", "output"])


def main(argv):
  del argv
  config = _CONFIG.value
  load = convert.import_diffusers if _SOURCE.value == "diffusers" else convert.import_upstream
  try:
    model = load(_INPUT.value, config, seed=_SEED.value)
    path = convert.save(model, _OUTPUT.value, config)
  except (CheckpointError, ValueError) as e:
    print(f"import_checkpoint: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"import_checkpoint: wrote {path}")


if __name__ == "__main__":
  app.run(main)
