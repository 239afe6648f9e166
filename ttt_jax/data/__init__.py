"""Training data: the generated storyboard dataset, its format and the grain pipeline.

  dataset.py     on-disk format (tensorstore latents + text embeddings, index.jsonl), reader
  storyboard.py  the generated sprite-storyboard dataset of the tiny presets
  pipeline.py    grain pipeline: shuffle, per-host slices of global batches, resumable state
"""

from ttt_jax.data.dataset import Dataset, DatasetError, open_dataset
from ttt_jax.data.storyboard import generate_dataset

_PIPELINE = ("Pipeline", "dataset_path", "from_config", "make_pipeline")


def __getattr__(name):
  # The pipeline (and grain) loads on first use: sampling and compile-only runs, which read the
  # storyboard text embedder from this package, work where grain is not installed (e.g. the
  # GPU image).
  if name in _PIPELINE:
    from ttt_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    return getattr(pipeline, name)
  raise AttributeError(f"module 'ttt_jax.data' has no attribute {name!r}")
