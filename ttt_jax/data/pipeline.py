"""The grain input pipeline: shuffled, host-sharded, batched, prefetched, resumable.

Sample order (spec 6.5): an infinite stream of epochs, each a fixed random permutation of the
dataset (seed `data.shuffle_seed`, folded with the epoch number by grain, so epochs differ but
are reproducible). The stream is cut into global batches of `train.batch_size`; process i of P
gets rows [i*b, (i+1)*b) of every global batch (b = batch_size / P), the layout
`ttt_jax.distributed.global_batch` expects. A global batch may straddle two epochs when the
dataset size is not a multiple of the batch size; no clip is dropped.

`get_state()` is grain's iterator state ({"next_index": k}: the next host batch), JSON
serialisable; `set_state` on a fresh pipeline resumes with exactly the batches the old one
would have produced next (reads are deterministic, mean/logvar draws included).
"""

from __future__ import annotations

import pathlib

import grain
import jax

from ttt_jax.data import dataset as dataset_lib


class Pipeline:
  """Iterator of host batches {"latents": [b, T, C, H, W] f32, "text": [b, n, L, D] f32,
  "row": [b] int32}; infinite. get_state()/set_state(state) save and restore the position."""

  def __init__(self, iter_dataset, batch_size: int, process_index: int, process_count: int):
    self.batch_size, self.process_index, self.process_count = (batch_size, process_index,
                                                               process_count)
    self._iter_dataset = iter_dataset
    self._iterator = iter(iter_dataset)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._iterator)

  def get_state(self) -> dict:
    """JSON-serialisable position of the pipeline (batches consumed by this process)."""
    return dict(self._iterator.get_state())

  def set_state(self, state: dict):
    """Resumes at `state` (from get_state of a pipeline built with the same arguments)."""
    self._iterator.set_state(dict(state))


def make_pipeline(dataset: dataset_lib.Dataset, *, global_batch_size: int, seed: int,
                  process_index: int | None = None, process_count: int | None = None,
                  num_threads: int = 2, prefetch: int = 4) -> Pipeline:
  """This host's batches of `dataset` (see the module docstring for the order)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"train.batch_size={global_batch_size} is not divisible by the "
                     f"{process_count} processes; use a multiple of {process_count}.")
  if len(dataset) < global_batch_size:
    raise ValueError(f"dataset {dataset.path} has {len(dataset)} clips, fewer than one global "
                     f"batch (train.batch_size={global_batch_size}); lower train.batch_size or "
                     "use more clips (data.num_clips).")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} outside [0, {process_count}).")
  b = global_batch_size // process_count
  num = len(dataset)

  def read(stream_index, clip_index):
    # stream_index counts samples over epochs; the epoch seeds a mean/logvar draw.
    return dataset.read(int(clip_index), seed=seed, epoch=stream_index // num)

  ds = (grain.MapDataset.range(num)
        .shuffle(seed=seed)  # reseeded with the epoch number under repeat()
        .repeat()  # infinite stream of epochs
        .map_with_index(read)
        .batch(b, drop_remainder=True))  # stream of host-sized pieces of global batches
  # Global batch s is pieces s*P .. s*P+P-1; this process takes piece s*P + process_index.
  ds = ds[process_index::process_count]
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=prefetch))
  return Pipeline(iter_ds, b, process_index, process_count)


def dataset_path(config) -> pathlib.Path:
  """The dataset folder of a config: `<data.root>/<seconds>s`."""
  return pathlib.Path(config.data.root) / f"{config.seconds}s"


def open_for_config(config) -> dataset_lib.Dataset:
  """Opens the config's dataset, generating it first when missing and `data.generate` is set.

  With several processes on a shared file system every process may generate; the first
  finished copy wins (atomic rename) and the others are discarded.
  """
  path = dataset_path(config)
  if not (path / "meta.json").exists() and config.data.generate:
    from ttt_jax.data import storyboard  # pylint: disable=g-import-not-at-top
    try:
      storyboard.generate_dataset(path, config)
    except dataset_lib.DatasetError:
      if not (path / "meta.json").exists():
        raise
  return dataset_lib.open_dataset(path, config)


def from_config(config, *, process_index: int | None = None,
                process_count: int | None = None) -> Pipeline:
  """The training pipeline of a config (data.* and train.batch_size)."""
  d = config.data
  return make_pipeline(open_for_config(config), global_batch_size=config.train.batch_size,
                       seed=d.shuffle_seed, process_index=process_index,
                       process_count=process_count, num_threads=d.num_threads,
                       prefetch=d.prefetch)
