"""Training checkpoints: orbax CheckpointManager with the data position, preemption saves.

A step folder holds three items:

  params     the parameters (float32), read alone by the next curriculum stage (`init_from`)
  opt        {"step", "opt_state"}: AdamW moments and the step counter
  data       the grain iterator state (JSON): the batches consumed so far

orbax writes each step into a temporary folder and renames it when every item is written
(asynchronously, while training goes on); a run killed at any moment leaves only complete
steps behind, and `latest_step` never returns a half-written one.
"""

from __future__ import annotations

import pathlib
import signal

import orbax.checkpoint as ocp

from ttt_jax.checkpoint.tensor_files import CheckpointError


class Checkpoints:
  """Asynchronous saves of the train state and data position; keeps the last `keep`."""

  def __init__(self, directory, *, keep: int):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("params", "opt", "data"))
    self._sigterm = False
    self._previous_handler = None

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_state: dict):
    """Starts saving `state` after `step` steps and the data position; returns at once."""
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        opt=ocp.args.StandardSave({"step": state["step"], "opt_state": state["opt_state"]}),
        data=ocp.args.JsonSave(data_state))
    self._manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state) -> tuple[dict, dict]:
    """(state, data_state) of `step`, each array read into the sharding of `abstract_state`
    (jax.ShapeDtypeStruct leaves with shardings)."""
    opt = {"step": abstract_state["step"], "opt_state": abstract_state["opt_state"]}
    restored = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state["params"]),
        opt=ocp.args.StandardRestore(opt), data=ocp.args.JsonRestore()))
    state = {"step": restored.opt["step"], "params": restored.params,
             "opt_state": restored.opt["opt_state"]}
    return state, dict(restored.data)

  def should_stop(self, step: int) -> bool:
    """True once SIGTERM arrived or the cluster signals preemption (the caller then saves
    with force=True and exits)."""
    return self._sigterm or self._manager.reached_preemption(step)

  def __enter__(self):
    def handler(signum, frame):
      del signum, frame
      self._sigterm = True  # acted on between steps: a save never runs inside a handler
    self._previous_handler = signal.signal(signal.SIGTERM, handler)
    return self

  def __exit__(self, *exc):
    self._manager.wait_until_finished()
    self._manager.close()
    signal.signal(signal.SIGTERM, self._previous_handler or signal.SIG_DFL)


def load_params(path, abstract_params):
  """Parameters to start from: a training workdir (its latest step) or an imported checkpoint
  (`launch/import_checkpoint.py`), read into the shardings of `abstract_params`."""
  path = pathlib.Path(path).absolute()
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if (path / "params").is_dir() and not any(p.name.isdigit() for p in path.iterdir()):
    item = path / "params"  # ttt_jax.checkpoint.save
  else:
    steps = sorted(int(p.name) for p in path.glob("*") if p.name.isdigit())
    if not steps:
      raise CheckpointError(f"train.init_from={str(path)!r} holds no checkpoint: expected a "
                            "training workdir (checkpoints/<step>/params) or an imported "
                            "checkpoint (params/).")
    item = path / str(steps[-1]) / "params"
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(item, abstract_params)
  except (ValueError, KeyError) as e:
    raise CheckpointError(f"train.init_from={str(path)!r}: its parameters do not match this "
                          f"model config ({e}); use a checkpoint of the same preset.") from e

