"""The training loop: config -> sharded state -> jitted steps over the grain pipeline.

  train(config, workdir)   one curriculum stage; resumes from `<workdir>/checkpoints` if any,
                           else starts from `train.init_from` (a previous stage or an
                           import), else from a fresh initialisation

`<workdir>` receives `config.json`, `checkpoints/`, `metrics.jsonl`, `tb/` (TensorBoard),
`loss.svg` and, on request (`train.profile_steps`), a `jax.profiler` trace in `trace/`.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np
import tqdm

from ttt_jax import config as config_lib
from ttt_jax import data, distributed, sharding
from ttt_jax.train import checkpoints as ckpt_lib
from ttt_jax.train import metrics as metrics_lib
from ttt_jax.train import optim
from ttt_jax.train import step as step_lib


def validate(config) -> None:
  """config.validate plus the training fields; errors name the field and the fix."""
  config_lib.validate(config)
  c, req = config.train, config_lib.require
  req(c.adapter in optim.ADAPTERS, "train.adapter", c.adapter, f"use one of {optim.ADAPTERS}.")
  for name in ("lr_schedule", "lr_ttt_schedule"):
    req(c[name] in optim.SCHEDULES, f"train.{name}", c[name], f"use one of {optim.SCHEDULES}.")
  for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints",
               "log_every"):
    req(isinstance(c[name], int) and c[name] > 0, f"train.{name}", c[name],
        "must be a positive integer.")
  req(isinstance(c.warmup_steps, int) and 0 <= c.warmup_steps <= c.steps, "train.warmup_steps",
      c.warmup_steps, f"must be an integer in [0, train.steps={c.steps}].")
  for name in ("lr", "lr_end", "lr_ttt"):
    req(c[name] > 0, f"train.{name}", c[name], "must be > 0.")
  req(c.timesteps in ("stratified", "uniform"), "train.timesteps", c.timesteps,
      "use 'stratified' or 'uniform'.")
  req(0.0 <= config.data.text_dropout < 1.0, "data.text_dropout", config.data.text_dropout,
      "must be in [0, 1).")
  req(c.adapter != "sft" or config.sharding.mesh_shape[2] == 1, "train.adapter", c.adapter,
      "upstream allows tensor parallelism only with qkvo/none (spec 6.2); use "
      "sharding.mesh_shape with tensor=1 or train.adapter=qkvo.")
  _profile_range(c.profile_steps)


def _profile_range(text: str) -> tuple[int, int] | None:
  if not text:
    return None
  try:
    start, stop = (int(x) for x in text.split(":"))
  except ValueError:
    start = stop = -1
  config_lib.require(0 <= start < stop, "train.profile_steps", text,
                     "use 'START:STOP' (steps START..STOP-1 are traced) or ''.")
  return start, stop


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def train(config, workdir) -> dict:
  """Runs `config.train.steps` optimiser steps (resuming if possible); returns a summary."""
  validate(config)
  workdir = pathlib.Path(workdir).absolute()
  c = config.train
  mesh = sharding.mesh_from_config(config)
  step_lib.check_batch(config, mesh)
  rules = config.sharding.rules
  pipeline = data.from_config(config)
  graphdef, abstract_params = step_lib.sharded_abstract_params(config, mesh)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  with ckpt_lib.Checkpoints(workdir / "checkpoints", keep=c.keep_checkpoints) as ckpts:
    start = ckpts.latest_step()
    if start is not None:  # resume: parameters, optimiser and data position
      abstract = step_lib.abstract_state(config, mesh, abstract_params)
      state, data_state = ckpts.restore(start, abstract)
      pipeline.set_state(data_state)
      origin = f"resumed at step {start}"
    else:
      start = 0
      if c.init_from:
        params = ckpt_lib.load_params(c.init_from, abstract_params)
        origin = f"initialised from {c.init_from}"
      else:
        params = step_lib.init_params(config, mesh, seed=c.seed)
        origin = "initialised from scratch"
      state = step_lib.init_state(config, mesh, params)

    if start >= c.steps:  # finished earlier (a rerun of a curriculum): nothing to compile
      print(f"train: {workdir} already holds step {start} of {c.steps}", flush=True)
      return _summary(config, workdir, start)

    def next_batch():
      host = next(pipeline)
      return {k: distributed.global_batch(host[k], mesh, rules, c.batch_size)
              for k in ("latents", "text")}

    batch = next_batch()
    compiled = step_lib.jit_train_step(config, mesh, graphdef, state).lower(
        state, batch).compile()
    flops = _flops(compiled)
    tokens = config_lib.sequence_layout(config).total_tokens * c.batch_size
    profile = _profile_range(c.profile_steps)
    print(f"train: {config.preset} {config.seconds} s {config.model.variant}, "
          f"{len(jax.devices())} devices, mesh {dict(mesh.shape)}; {origin}; "
          f"{flops / 1e12:.3g} TFLOP per step; workdir {workdir}", flush=True)

    writer = metrics_lib.MetricWriter(workdir)
    bar = tqdm.tqdm(total=c.steps, initial=start, disable=jax.process_index() != 0,
                    desc="train", unit="step", dynamic_ncols=True)
    step, tic, logged, pending = start, time.perf_counter(), start, []
    while step < c.steps:
      if profile and step == profile[0]:
        jax.profiler.start_trace(str(workdir / "trace"))
      state, metrics = compiled(state, batch)
      pending.append(metrics)  # device arrays: fetching them every step would stall dispatch
      step += 1
      if profile and step == profile[1]:
        jax.profiler.stop_trace()
      if step % c.log_every == 0 or step == c.steps:
        # Means over the steps since the last log; fetching waits for them, so the time is real.
        means = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in metrics}
        seconds = (time.perf_counter() - tic) / (step - logged)
        tic, logged, pending = time.perf_counter(), step, []
        writer.write(step, {**means, "step_time_s": seconds, "tokens_per_s": tokens / seconds,
                            "tflops_per_s": flops / seconds / 1e12})
        bar.set_postfix(loss=f"{means['loss']:.4f}")
      bar.update(1)
      stop = ckpts.should_stop(step)
      if stop or step % c.checkpoint_every == 0 or step == c.steps:
        ckpts.save(step, state, pipeline.get_state())
      if stop:
        print(f"train: stopping at step {step} (SIGTERM or preemption), checkpoint saved",
              flush=True)
        break
      if step < c.steps:
        batch = next_batch()
    bar.close()
  writer.close()
  return _summary(config, workdir, step)


def _summary(config, workdir, step: int) -> dict:
  """{workdir, step, seconds, first/last loss}; redraws loss.svg (process 0)."""
  summary = {"workdir": str(workdir), "step": step, "seconds": config.seconds}
  if jax.process_index() == 0 and (workdir / "metrics.jsonl").exists():
    records = metrics_lib.read_metrics(workdir)
    metrics_lib.plot_loss_svg(records, workdir / "loss.svg",
                              title=f"{config.preset} {config.seconds} s training loss")
    losses = np.array([r["loss"] for r in records])
    summary.update(first_loss=float(losses[:3].mean()), last_loss=float(losses[-3:].mean()))
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary
