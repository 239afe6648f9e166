"""Training data: the generated storyboard dataset, its format and the grain pipeline.

  dataset.py     on-disk format (tensorstore latents + text embeddings, index.jsonl), reader
  storyboard.py  the generated sprite-storyboard dataset of the tiny presets
  pipeline.py    grain pipeline: shuffle, per-host slices of global batches, resumable state
"""

from ttt_jax.data.dataset import Dataset, DatasetError, open_dataset
from ttt_jax.data.pipeline import Pipeline, dataset_path, from_config, make_pipeline
from ttt_jax.data.storyboard import generate_dataset
