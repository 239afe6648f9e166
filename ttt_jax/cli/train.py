"""Trains one curriculum stage, or several in a row.

  python launch/train.py --workdir=runs/tiny                      # tiny 3 s on generated data
  python launch/train.py --config=configs/default.py:preset=5b,seconds=9 \
      --config.train.init_from=runs/5b/3s --workdir=runs/5b/9s   # one stage of the paper
  python launch/train.py --curriculum=3,9 --workdir=runs/tiny     # 3 s, then 9 s from it

With --curriculum, stage s runs in `<workdir>/<s>s` and starts from the previous stage's last
checkpoint (the first from `train.init_from`, if set). Re-running the same command resumes
where a killed run stopped. Multi-host: run on every host (launch/tpu_pod.sh,
launch/slurm_gpu.sbatch); `ttt_jax.distributed.initialize` joins them.
"""

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ttt_jax import distributed
from ttt_jax.checkpoint import CheckpointError
from ttt_jax.config import ConfigError
from ttt_jax.data import DatasetError

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Training config.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "Output folder of the run.")
_CURRICULUM = flags.DEFINE_list("curriculum", [], "Durations in seconds to train in order, "
                                "e.g. 3,9,18,30,63; empty: the config's stage only.")


def _flatten(config, prefix=()):
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _diff(config, base) -> dict:
  """{path: value} of the leaves where `config` differs from `base` (the user's overrides)."""
  base = dict(_flatten(base))
  return {p: v for p, v in _flatten(config) if p[0] != "sequence" and base.get(p) != v}


def _set(config, path, value):
  for key in path[:-1]:
    config = config[key]
  config[path[-1]] = value


def main(argv):
  del argv
  from configs import default  # pylint: disable=g-import-not-at-top
  from ttt_jax.train import loop  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  distributed.initialize()
  config = _CONFIG.value
  workdir = pathlib.Path(_WORKDIR.value)
  try:
    if not _CURRICULUM.value:
      print(loop.train(config, workdir))
      return
    # What the user overrode (--config.x.y=...) applies to every stage; the rest (duration,
    # the stage's recipe) comes from the stage's own config.
    arg = f"preset={config.preset},variant={config.model.variant}"
    overrides = _diff(config, default.get_config(f"{arg},seconds={config.seconds}"))
    init_from = config.train.init_from
    for seconds in map(int, _CURRICULUM.value):
      stage = default.get_config(f"{arg},seconds={seconds}")
      for path, value in overrides.items():
        _set(stage, path, value)
      stage.train.init_from = init_from
      summary = loop.train(stage, workdir / f"{seconds}s")
      print(summary)
      init_from = summary["workdir"]
  except (ConfigError, CheckpointError, DatasetError, ValueError) as e:
    print(f"train: {e}", file=sys.stderr)
    sys.exit(1)


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
