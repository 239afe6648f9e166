"""Sampling (spec 4.2-4.7): timesteps, CFG table, sampler vs a NumPy transcription, storyboard
files, and generation end to end on the tiny preset."""

import json
import math
import pathlib
import subprocess
import sys

import imageio.v2 as imageio
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from ttt_jax import diffusion, sharding
from ttt_jax.sampling import generate as generate_lib
from ttt_jax.sampling import sampler, storyboard, video
from ttt_jax.sampling.storyboard import StoryboardError
from ttt_jax.train import step

# Spec 4.2 and 4.5, copied from the spec.
TIMESTEPS = [999, 979, 959, 939, 919, 899, 879, 859, 839, 819, 799, 779, 759, 739, 719, 699,
             679, 659, 639, 619, 599, 579, 559, 539, 519, 499, 479, 459, 439, 419, 399, 379,
             359, 339, 319, 299, 279, 259, 239, 219, 199, 179, 159, 139, 119, 99, 79, 59, 39,
             19]
CFG_TABLE = [2.291, 2.544, 6.974, 6.420, 2.788, 4.272, 1.038, 4.170, 1.618, 6.983, 1.005, 2.872,
             6.977, 1.633, 4.330, 2.437, 6.377, 6.007, 3.448, 3.198, 1.655, 6.610, 1.195, 4.295,
             6.985, 1.521, 1.762, 1.058, 4.128, 1.482, 2.003, 5.948, 4.143, 6.531, 6.140, 7.000,
             6.168, 1.120, 2.098, 6.685, 6.999, 2.343, 6.213, 1.251, 7.000, 6.864, 1.064, 1.000,
             1.000, 1.123]
EXAMPLE_9S = "examples/storyboard-9s.json"


def test_timesteps():
  assert sampler.sampler_timesteps(50).tolist() == TIMESTEPS


def test_dynamic_cfg_scales():
  literal = sampler.dynamic_cfg_scales(TIMESTEPS, 6, 5, "literal")
  np.testing.assert_allclose(literal, CFG_TABLE, atol=5e-4)
  smooth = sampler.dynamic_cfg_scales(TIMESTEPS, 6, 5, "smooth")
  assert smooth[0] == 1.0 and np.all(np.diff(smooth) >= 0)
  assert 6.8 < smooth[-1] < 7.0


def test_quantisation():
  tables = sampler.dpmpp_2m_sde_tables(50)
  t = np.array(TIMESTEPS)
  np.testing.assert_array_equal(tables.q_index, np.where(t <= 219, t - 1, t))
  np.testing.assert_array_equal(tables.a_q, diffusion.alphas_cumprod_sqrt()[tables.q_index])


def _numpy_reference(num_steps, x_T, key, denoise, steps):
  """Spec 4.4 transcribed in float64: the first `steps` iterations; returns (x, D list)."""
  t = [int(999 - k * 999 / num_steps) for k in range(num_steps)]
  a_sub = diffusion.alphas_cumprod_sqrt(sorted(t))[::-1].astype(np.float64)
  A = list(a_sub) + [1.0]
  a_full = diffusion.alphas_cumprod_sqrt()
  sig = lambda a: math.sqrt(1.0 - a * a)
  lam = lambda a: math.log(a / sig(a))
  x, ds = np.asarray(x_T, np.float64), []
  for i in range(steps):
    a_q = float(a_full[np.argmin(np.abs(np.float32(A[i]) - a_full))])
    d = denoise(x, a_q, float(t[i]))
    ds.append(d)
    if i == num_steps - 1:
      return d, ds
    eps = np.asarray(sampler.step_noise(key, i, x.shape), np.float64)
    if i == 0:  # h = inf: x_1 = A[1] D_0 + sigma(A[1]) eps
      x = A[1] * d + sig(A[1]) * eps
      continue
    h = lam(A[i + 1]) - lam(A[i])
    m1 = sig(A[i + 1]) / sig(A[i]) * math.exp(-h)
    m2 = math.expm1(-2 * h) * A[i + 1]
    s_noise = sig(A[i + 1]) * math.sqrt(1 - math.exp(-2 * h))
    if i == 1:  # r = inf: D' = D_1
      d_prime = d
    else:
      r = (lam(A[i]) - lam(A[i - 1])) / h
      d_prime = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * ds[-2]
    x = m1 * x - m2 * d_prime + s_noise * eps
  return x, ds


def _toy(x, a_q, t):
  """A denoiser that depends on x, a_q and t (so the tables' a_q and t are checked too)."""
  return 0.5 * x + 0.3 * a_q - 1e-4 * t


def test_sampler_matches_numpy_transcription():
  num_steps = 50
  tables = sampler.dpmpp_2m_sde_tables(num_steps)
  np.testing.assert_array_equal(tables.timesteps, TIMESTEPS)
  assert tables.A[0] == 0.0 and tables.A[-1] == 1.0 and len(tables.A) == 51
  key = jax.random.key(3)
  x_T = np.asarray(jax.random.normal(jax.random.key(4), (2, 3, 5)), np.float32)
  denoise_fn = lambda operand, x, a_q, t, w: _toy(x, a_q, t)
  coeffs = tables.device_coefficients(np.ones(num_steps))
  for steps in (1, 2, 3):
    rows = {k: v[:steps] for k, v in coeffs.items()}
    ours = sampler.sample_loop(denoise_fn, None, jnp.asarray(x_T), key, rows)
    ref, _ = _numpy_reference(num_steps, x_T, key, _toy, steps)
    np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=2e-5, err_msg=f"step {steps}")
  final = sampler.sample(denoise_fn, jnp.asarray(x_T), key, tables)
  ref, ds = _numpy_reference(num_steps, x_T, key, _toy, num_steps)
  np.testing.assert_allclose(final, ds[-1], rtol=1e-4, atol=1e-4)


def test_ddim_recovers_a_perfect_denoiser():
  x0 = jnp.linspace(-1, 1, 12).reshape(3, 4)
  tables = sampler.ddim_tables(10)
  out = sampler.sample(lambda op, x, a_q, t, w: x0, jnp.zeros_like(x0), jax.random.key(0),
                       tables)
  np.testing.assert_allclose(out, x0, atol=1e-6)


def _write(tmp_path, videos, name="s.json"):
  path = tmp_path / name
  path.write_text(json.dumps(videos))
  return path


def test_storyboard_scene_tokens(tmp_path):
  videos = storyboard.load(EXAMPLE_9S)
  assert all(len(v) == 3 for v in videos)
  seg = lambda text, flag=False, **kw: dict(text=text, requires_scene_transition=flag, **kw)
  path = _write(tmp_path, [[seg("a", True), seg("b", True, neg_text="n"), seg("c")]])
  (video_0,) = storyboard.load(path)
  texts, negatives = storyboard.prompts(video_0)
  assert texts == ["a<end_scene>", "<start_scene>b", "c"]
  assert negatives == ["", "n", ""]
  assert storyboard.seconds_of(video_0) == 9
  jsonl = tmp_path / "s.jsonl"
  jsonl.write_text(json.dumps([seg("x")]) + "\n\n" + json.dumps([seg("y")]) + "\n")
  assert [v[0].text for v in storyboard.load(jsonl)] == ["x", "y"]


@pytest.mark.parametrize("videos, parts", [
    ([[{"text": "a", "colour": "red"}]], ["video 0", "segment 0", "'colour'", "unknown field"]),
    ([[{"text": "a"}], [{"text": " "}]], ["video 1", "segment 0", "'text'", "non-empty"]),
    ([[{"text": "a"}] * 4], ["video 0", "4 segments", "no supported duration", "3 (9 s)"]),
    ([[{"text": "a"}] * 22], ["video 0", "22 segments", "more than the 21", "split"]),
    ([[{"text": "a"}, {"text": "b", "requires_scene_transition": "yes"}, {"text": "c"}]],
     ["video 0", "segment 1", "'requires_scene_transition'", "true or false"]),
    ([[{"text": "a", "neg_text": 3}]], ["segment 0", "'neg_text'", "string"]),
])
def test_storyboard_errors(tmp_path, videos, parts):
  path = _write(tmp_path, videos)
  with pytest.raises(StoryboardError) as e:
    storyboard.load(path)
  for part in [str(path)] + parts:
    assert part in str(e.value), (part, str(e.value))


def test_storyboard_bad_json(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text('[[{"text": "a"}]')
  with pytest.raises(StoryboardError, match="not valid JSON"):
    storyboard.load(path)
  with pytest.raises(StoryboardError, match="wrap it in another array"):
    storyboard.load(_write(tmp_path, [{"text": "a"}]))
  jsonl = tmp_path / "bad.jsonl"
  jsonl.write_text('[{"text": "a"}]\n[{"text": "b"}\n')
  with pytest.raises(StoryboardError, match="line 2 .video 1. is not valid JSON"):
    storyboard.load(jsonl)
  with pytest.raises(StoryboardError, match="use .json"):
    storyboard.load(_write(tmp_path, [[{"text": "a"}]], name="s.yaml"))


def test_generate_tiny_end_to_end(tmp_path):
  config = get_config("preset=tiny,seconds=3")  # the storyboard's 9 s is set by generate
  config.model.num_layers = 1
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  params = step.init_params(config, mesh, seed=0)
  graphdef, _ = step.abstract_model(config)
  story = storyboard.load(EXAMPLE_9S)[0]
  run = lambda seed: generate_lib.generate(config, params, graphdef, story, seed=seed,
                                           num_steps=4, progress=False)
  latents = run(0)
  assert latents.shape == (37, 12, 4, 6) and np.isfinite(latents).all()
  np.testing.assert_array_equal(run(0), latents)
  assert not np.allclose(run(1), latents)

  frames = video.decode_tiny(latents, config)
  path = video.write_mp4(frames, tmp_path / "video_0.mp4")
  reader = imageio.get_reader(path)
  back = [f for f in reader]
  reader.close()
  assert len(back) == 1 + 4 * (37 - 1) and back[0].shape == (192, 288, 3)
  sheet = imageio.imread(video.contact_sheet(frames, tmp_path / "video_0.png"))
  assert sheet.ndim == 3 and sheet.shape[2] == 3


def test_sampling_and_compile_only_do_not_need_grain():
  """The GPU image has no grain: sampling and the compile-only planner must not import it
  (the data package loads its grain pipeline on first use only)."""
  code = ("import sys, ttt_jax.sampling.generate, ttt_jax.aot, ttt_jax.data; "
          "assert 'grain' not in sys.modules, 'grain imported'; "
          "ttt_jax.data.make_pipeline; assert 'grain' in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                 cwd=pathlib.Path(__file__).parents[1])
