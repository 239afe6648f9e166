"""Training: schedule, loss, optimiser groups and AdamW against independent NumPy derivations;
frozen parameters; the sharded step; loss falling; kill-and-resume exactness."""

import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs.default import get_config
from ttt_jax import diffusion, sharding
from ttt_jax.config import ConfigError
from ttt_jax.train import loop, metrics, optim
from ttt_jax.train import step as step_lib

ROOT = pathlib.Path(__file__).parents[1]


def _config(tmp_path, **train):
  """Tiny 3 s model with one layer (fast to compile) on a small generated dataset."""
  config = get_config("preset=tiny,seconds=3")
  config.model.num_layers = 1
  config.data.root = str(tmp_path / "data")
  config.data.num_clips = 16
  config.train.update(dict(batch_size=4, steps=4, warmup_steps=1, log_every=1,
                           checkpoint_every=2), **train)
  return config


# --- the diffusion process (spec 4.1, 6.4), derived here in float64 ---------------------------

def _zero_snr_table(timesteps):
  t = np.arange(1000, dtype=np.float64)
  betas = (math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * t / 999) ** 2
  a = np.sqrt(np.cumprod(1 - betas)[list(timesteps)].astype(np.float32))
  return (a - a[-1]) * a[0] / (a[0] - a[-1])


def test_noise_schedule_matches_derivation():
  a = diffusion.alphas_cumprod_sqrt()
  np.testing.assert_allclose(a, _zero_snr_table(range(1000)), rtol=1e-6, atol=1e-7)
  assert a[999] == 0 and abs(a[0] - 0.9995749) < 1e-6 and abs(a[500] - 0.4909) < 1e-4
  steps = [int(999 - k * 999 / 50) for k in range(50)][::-1]  # 19, 39, ..., 999
  sub = diffusion.alphas_cumprod_sqrt(steps)
  np.testing.assert_allclose(sub, _zero_snr_table(steps), rtol=1e-6, atol=1e-7)
  diff = np.abs(sub - a[steps])  # the sampler's table differs most at t = 19 (spec 4.1)
  assert diff.argmax() == 0 and 6.0e-4 < diff.max() < 6.4e-4


def test_v_loss_equals_weighted_x0_loss():
  """mean((F - v)^2) == mean(w (x0_hat - x0)^2), w = 1 / (1 - a^2) (spec 6.4), in float64."""
  rng = np.random.default_rng(0)
  x0, noise, pred = (rng.normal(size=(3, 2, 5)) for _ in range(3))
  a = diffusion.alphas_cumprod_sqrt()[[0, 500, 998]].astype(np.float64)
  with jax.enable_x64(True):
    got = np.asarray(diffusion.v_loss(pred, x0, noise, jax.numpy.asarray(a)))
  ab = a[:, None, None]
  x_t = ab * x0 + np.sqrt(1 - ab ** 2) * noise
  x0_hat = ab * x_t - np.sqrt(1 - ab ** 2) * pred
  want = (np.square(x0_hat - x0) / (1 - ab ** 2)).reshape(3, -1).mean(1)
  np.testing.assert_allclose(got, want, rtol=1e-9)


@pytest.mark.parametrize("batch,strata", [(64, 8), (8, 8), (6, 2), (1, 1)])
def test_stratified_timesteps(batch, strata):
  t = np.asarray(diffusion.stratified_timesteps(jax.random.key(1), batch))
  per = batch // strata
  width = 1000 // strata
  assert t.shape == (batch,) and t.min() >= 0 and t.max() < 1000
  np.testing.assert_array_equal(t // width, np.arange(batch) // per)


# --- optimiser (spec 6.2, 6.3) ------------------------------------------------------------------

def _spec_lr(s, peak, end, warmup, total, kind):
  if s < warmup:
    return peak * (s + 1) / warmup
  p = min((s - warmup) / max(1, total - warmup), 1)
  if kind == "linear":
    return peak * (1 - p * (1 - end / peak))
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * p))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedules_match_spec(kind):
  lr = optim.schedule(1e-4, 1e-5, 10, 110, kind)
  for s in (0, 5, 9, 10, 11, 60, 109, 110, 200):
    assert abs(float(lr(s)) - _spec_lr(s, 1e-4, 1e-5, 10, 110, kind)) < 1e-10


def test_parameter_groups_follow_upstream_names():
  path = lambda s: tuple(s.split("/"))
  cases = {
      "layers/seq_modeling_block/ssm/W1": "ttt_decay",
      "layers/seq_modeling_block/ssm/b1": "ttt_nodecay",
      "layers/seq_modeling_block/ssm/learnable_ttt_lr_weight": "ttt_decay",
      "layers/seq_modeling_block/ssm/learnable_ttt_lr_bias": "ttt_nodecay",
      "layers/seq_modeling_block/ssm/post_norm/scale": "ttt_nodecay",
      "layers/seq_modeling_block/ssm/wq/kernel": "ttt_decay",
      # Gates contain "ssm" and no no-decay pattern: decayed TTT parameters (spec 6.3).
      "layers/seq_modeling_block/forward_ssm_gating_video/gating_alpha": "ttt_decay",
      "layers/seq_modeling_block/q/kernel": "other_decay",
      "layers/seq_modeling_block/q_norm/scale": "other_nodecay",
      "layers/mlp/layer1/kernel": "other_decay",
      "patch_embedding/vid_proj/bias": "other_nodecay",
  }
  for name, group in cases.items():
    assert optim.label(path(name), "sft") == group, name
  assert optim.label(path("layers/mlp/layer1/kernel"), "qkvo") == "frozen"
  assert optim.label(path("final_layer/linear/kernel"), "qkvo") == "frozen"
  assert optim.label(path("layers/seq_modeling_block/q_norm/scale"), "qkvo") == "other_nodecay"
  assert optim.label(path("layers/seq_modeling_block/q_norm/scale"), "none") == "frozen"
  assert optim.label(path("layers/seq_modeling_block/q/kernel"), "none") == "other_decay"


def test_adamw_matches_torch_semantics(tmp_path):
  """Two steps of our optimiser == a NumPy transcription of torch AdamW + clip_grad_norm_."""
  config = _config(tmp_path, lr=1e-3, lr_ttt=3e-3, lr_end=1e-4, weight_decay=0.1, steps=3,
                   warmup_steps=1, grad_clip=0.5)
  c = config.train
  _, abstract = step_lib.abstract_model(config)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)
  grads = [jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)
           for _ in range(2)]
  optimizer, labels = optim.make_optimizer(params, c)
  state, p = optimizer.init(params), params
  for g in grads:
    updates, state = optimizer.update(g, state, p)
    p = step_lib._apply_updates(p, updates, labels)

  flat = lambda t: jax.tree_util.tree_flatten_with_path(t)[0]
  names = [k for k, _ in flat(params)]
  ref = {k: np.asarray(v, np.float64) for k, v in flat(params)}
  m = {k: 0.0 for k in names}
  v = {k: 0.0 for k in names}
  label = dict(flat(labels))
  for s, g in enumerate(grads):
    g = {k: np.asarray(x, np.float64) for k, x in flat(g)}
    norm = math.sqrt(sum(np.sum(x * x) for x in g.values()))
    scale = min(1.0, c.grad_clip / (norm + 1e-6))
    for k in names:
      kind = label[k].split("_")[0]
      peak, sched = (c.lr_ttt, c.lr_ttt_schedule) if kind == "ttt" else (c.lr, c.lr_schedule)
      lr = _spec_lr(s, peak, c.lr_end, c.warmup_steps, c.steps, sched)
      wd = c.weight_decay if label[k].endswith("_decay") else 0.0
      gk = g[k] * scale
      ref[k] = ref[k] * (1 - lr * wd)  # torch: decoupled decay first
      m[k] = c.b1 * m[k] + (1 - c.b1) * gk
      v[k] = c.b2 * v[k] + (1 - c.b2) * gk * gk
      m_hat, v_hat = m[k] / (1 - c.b1 ** (s + 1)), v[k] / (1 - c.b2 ** (s + 1))
      ref[k] = ref[k] - lr * m_hat / (np.sqrt(v_hat) + c.eps)
  for k, x in flat(p):
    np.testing.assert_allclose(np.asarray(x), ref[k], rtol=2e-5, atol=1e-6, err_msg=str(k))


# --- the train step -------------------------------------------------------------------------

def _batch(config, size):
  rng = np.random.default_rng(1)
  m, s = config.model, config.sequence
  return {"latents": rng.normal(size=(size, s.num_frames, m.in_channels, m.latent_height,
                                      m.latent_width)).astype(np.float32),
          "text": rng.normal(size=(size, s.num_chunks, s.text_length,
                                   m.text_dim)).astype(np.float32)}


def _run_steps(config, devices, batch, steps=2):
  mesh = sharding.mesh_from_config(config, devices)
  graphdef, _ = step_lib.abstract_model(config)
  state = step_lib.init_state(config, mesh, step_lib.init_params(config, mesh))
  fn = step_lib.jit_train_step(config, mesh, graphdef, state)  # places the NumPy batch
  for _ in range(steps):
    state, metrics = fn(state, batch)
  return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize("adapter", ["qkvo", "none"])
def test_frozen_parameters_stay_bit_identical(tmp_path, adapter):
  config = _config(tmp_path, adapter=adapter)
  mesh = sharding.mesh_from_config(config, jax.devices()[:1])
  initial = jax.device_get(step_lib.init_params(config, mesh))
  state, _ = _run_steps(config, jax.devices()[:1], _batch(config, 4))
  _, labels = optim.make_optimizer(initial, config.train)
  flat = lambda t: jax.tree_util.tree_flatten_with_path(t)[0]
  changed = {k: not np.array_equal(a, b)
             for (k, a), (_, b) in zip(flat(initial), flat(state["params"]))}
  for (k, label) in flat(labels):
    assert changed[k] == (label != "frozen"), (k, label)


def test_sharded_train_step_matches_single_device(tmp_path):
  config = _config(tmp_path, adapter="qkvo", batch_size=4)
  batch = _batch(config, 4)
  single, m1 = _run_steps(config, jax.devices()[:1], batch)
  config.sharding.mesh_shape = (2, 2, 2)
  sharded, m8 = _run_steps(config, jax.devices()[:8], batch)
  assert abs(m1["loss"] - m8["loss"]) <= 1e-5 * abs(m1["loss"])
  for a, b in zip(jax.tree.leaves(single["params"]), jax.tree.leaves(sharded["params"])):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_config_errors_name_the_field(tmp_path):
  for field, value, word in [("adapter", "lora", "train.adapter"),
                             ("profile_steps", "5", "train.profile_steps"),
                             ("warmup_steps", 10, "train.warmup_steps")]:
    config = _config(tmp_path, **{field: value})
    with pytest.raises(ConfigError, match=word):
      loop.validate(config)
  config = _config(tmp_path, batch_size=6)
  config.sharding.mesh_shape = (4, 1, 1)
  with pytest.raises(ValueError, match="train.batch_size=6"):
    step_lib.check_batch(config, sharding.mesh_from_config(config, jax.devices()[:4]))


# --- whole runs ------------------------------------------------------------------------------

def test_loss_falls_on_a_tiny_run(tmp_path):
  config = _config(tmp_path, steps=60, warmup_steps=5, lr=2e-3, lr_ttt=2e-3, lr_end=2e-3,
                   log_every=10, checkpoint_every=60, grad_clip=1.0, batch_size=8,
                   profile_steps="2:4")
  summary = loop.train(config, tmp_path / "run")
  losses = [r["loss"] for r in metrics.read_metrics(tmp_path / "run")]
  assert len(losses) == 6 and summary["step"] == 60
  assert losses[-1] < 0.85 * losses[0], losses  # untrained it stays at the first value
  assert (tmp_path / "run" / "loss.svg").read_text().startswith("<svg")
  assert list((tmp_path / "run" / "trace").rglob("*.xplane.pb"))  # the requested profile
  assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


def _train_cmd(workdir, data, steps):
  return [sys.executable, str(ROOT / "launch" / "train.py"), f"--workdir={workdir}",
          f"--config.data.root={data}", "--config.data.num_clips=16",
          "--config.model.num_layers=1", "--config.train.batch_size=8",
          f"--config.train.steps={steps}", "--config.train.warmup_steps=1",
          "--config.train.log_every=1", "--config.train.checkpoint_every=2"]


def _final_params(workdir):
  config = get_config("preset=tiny,seconds=3")
  config.model.num_layers = 1
  _, abstract = step_lib.abstract_model(config)
  from ttt_jax.train import checkpoints
  return jax.tree.leaves(checkpoints.load_params(workdir, abstract))


def _wait_for_step(workdir, step, proc, timeout=300):
  metrics = pathlib.Path(workdir) / "metrics.jsonl"
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and sum(1 for _ in metrics.open()) >= step:
      return
    time.sleep(0.05)
  raise AssertionError(f"the run did not reach step {step}: {proc.poll()}")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_same_parameters(tmp_path, how):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  data = tmp_path / "data"
  whole = subprocess.run(_train_cmd(tmp_path / "whole", data, 12), env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
  assert whole.returncode == 0, whole.stderr[-3000:]

  killed = subprocess.Popen(_train_cmd(tmp_path / "killed", data, 12), env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    # By step 5 the save of step 2 has committed (orbax finishes one async save before the
    # next, started at step 4), so the resume below starts from a real checkpoint.
    _wait_for_step(tmp_path / "killed", 5, killed)
    killed.send_signal(how)
    out, _ = killed.communicate(timeout=120)
  finally:
    killed.kill()
  if how == signal.SIGTERM:  # a clean stop with a checkpoint of the step it stopped at
    assert killed.returncode == 0 and "stopping at step" in out, out[-3000:]
  steps = sorted(int(p.name) for p in (tmp_path / "killed" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps and steps[-1] < 12, steps  # it really stopped early

  resumed = subprocess.run(_train_cmd(tmp_path / "killed", data, 12), env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed at step" in resumed.stdout
  for a, b in zip(_final_params(tmp_path / "whole"), _final_params(tmp_path / "killed")):
    np.testing.assert_array_equal(a, b)


def test_gradient_accumulation_equals_the_whole_batch(tmp_path):
  """Two micro-batches of 4 give the step of one batch of 8 (same draws, mean of means)."""
  batch = _batch(_config(tmp_path), 8)
  whole, m1 = _run_steps(_config(tmp_path, batch_size=8), jax.devices()[:1], batch, steps=1)
  accum, m2 = _run_steps(_config(tmp_path, batch_size=8, grad_accum=2), jax.devices()[:1],
                         batch, steps=1)
  for k in ("loss", "grad_norm"):  # the norm also checks the gradients' scale (Adam hides it)
    assert abs(m1[k] - m2[k]) <= 1e-5 * abs(m1[k]), k
  for a, b in zip(jax.tree.leaves(whole["params"]), jax.tree.leaves(accum["params"])):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
