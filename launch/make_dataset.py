"""Generates the storyboard dataset of a (tiny) config at `<data.root>/<seconds>s`.

  python launch/make_dataset.py --config=configs/default.py:preset=tiny,seconds=9
  python launch/make_dataset.py --config=configs/default.py:seconds=18 --config.data.num_clips=64

Training generates it on first use as well (data.generate); this script does it ahead of time,
e.g. once on a shared file system before a multi-host run. An existing dataset is kept
(--overwrite replaces it).
"""

import pathlib
import shutil
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from ttt_jax.data import dataset, pipeline, storyboard

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Model config.")
_OUTPUT = flags.DEFINE_string("output", None, "Dataset folder (default <data.root>/<seconds>s).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing dataset.")


def main(argv):
  del argv
  config = _CONFIG.value
  path = _OUTPUT.value or pipeline.dataset_path(config)
  start = time.perf_counter()
  try:
    if _OVERWRITE.value:
      shutil.rmtree(path, ignore_errors=True)
    exists = (pathlib.Path(path) / "meta.json").exists()
    if not exists:
      storyboard.generate_dataset(path, config)
    ds = dataset.open_dataset(path, config)
  except ValueError as e:  # DatasetError and config mismatches
    print(f"make_dataset: {e}", file=sys.stderr)
    sys.exit(1)
  m = ds.meta
  verb = "kept the existing" if exists else "wrote"
  print(f"make_dataset: {verb} {len(ds)} clips of {m['seconds']} s in {path} ("
        f"{time.perf_counter() - start:.1f} s; latents [T={m['T']}, C={m['C']}, H={m['H']}, "
        f"W={m['W']}], text [n={m['n']}, L={m['L']}, D={m['text_dim']}])")


if __name__ == "__main__":
  app.run(main)
