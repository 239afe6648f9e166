"""The DiT's multi-segment behaviour (spec 2.7, 3.1-3.2): windows, reversal, gates, variants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.default import get_config
from tests.oracles import numpy_rope, rel_err
from ttt_jax import config as config_lib
from ttt_jax.checkpoint import convert
from ttt_jax.nn import attention
from ttt_jax.nn.dit import DiT
from ttt_jax.sequence import SequenceLayout


def _randomize(model, seed=0, scale=0.1):
  """O(1) parameters so every path matters (the init's 0.02 normals are too small to test)."""
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    noise = scale * rng.normal(size=var[...].shape)
    if path[-1] == "kernel":
      noise *= 5 / np.sqrt(var[...].shape[-2])
    var[...] = var[...] + jnp.asarray(noise, var[...].dtype)
  return model


def _model(seconds=9, variant="ttt_mlp", seed=0, **model_overrides):
  config = get_config(f"seconds={seconds},variant={variant}")
  config.model.update(model_overrides)
  return config, _randomize(DiT.from_config(config, rngs=nnx.Rngs(seed)), seed)


def _inputs(config, batch=2, seed=1):
  m, s = config.model, config.sequence
  rng = np.random.default_rng(seed)
  video = rng.normal(size=(batch, s.num_frames, m.in_channels, m.latent_height,
                           m.latent_width)).astype(np.float32)
  text = rng.normal(size=(batch, s.num_chunks, s.text_length, m.text_dim)).astype(np.float32)
  return video, text, jnp.asarray([10.0, 700.0][:batch])


def test_windows_cover_segments_and_average_overlaps():
  lay = SequenceLayout(num_chunks=3, text_length=2, num_frames=37, grid_h=1, grid_w=2)
  _, W, count = attention._window_frames(lay, 12, 1)
  assert W == 13 and count.tolist() == [1] * 12 + [2] + [1] * 11 + [2] + [1] * 12
  text = np.arange(6, dtype=np.float32).reshape(1, 6, 1)
  video = 100 + np.arange(74, dtype=np.float32).reshape(1, 74, 1)
  windows = attention.segment_windows(text, video, lay, 12, 1)  # [3, 2 + 26, 1]
  assert windows.shape == (3, 28, 1)
  np.testing.assert_array_equal(windows[1, :2, 0], [2, 3])  # text chunk 1
  np.testing.assert_array_equal(windows[1, 2:, 0], 100 + np.arange(24, 50))  # frames 12..24
  t, v = attention.merge_windows(windows, lay, 12, 1)
  np.testing.assert_array_equal(t, text)
  np.testing.assert_array_equal(v, video)  # identity attention: averaging two equal copies
  # Window i's video rows set to i: the overlap frames 12 and 24 are the mean of two windows.
  marked = windows.at[:, 2:].set(jnp.arange(3.0)[:, None, None])
  _, v = attention.merge_windows(marked, lay, 12, 1)
  frames = np.asarray(v).reshape(37, 2)[:, 0]
  np.testing.assert_array_equal(frames, [0] * 12 + [0.5] + [1] * 11 + [1.5] + [2] * 12)


def test_window_sizes_must_tile_the_video():
  lay = SequenceLayout(num_chunks=3, text_length=2, num_frames=37, grid_h=1, grid_w=2)
  with pytest.raises(ValueError, match="model.attn_length"):
    attention._window_frames(lay, 11, 1)


def test_reversal_operator():
  lay = SequenceLayout(num_chunks=3, text_length=2, num_frames=37, grid_h=1, grid_w=1)
  x = np.arange(lay.total_tokens)
  r = lay.reverse(x, axis=0)
  np.testing.assert_array_equal(r[:6], [4, 5, 2, 3, 0, 1])  # chunk order reversed, not tokens
  np.testing.assert_array_equal(r[6:], 6 + np.arange(36, -1, -1))  # every video token reversed
  np.testing.assert_array_equal(lay.reverse(r, axis=0), x)
  one = SequenceLayout(num_chunks=1, text_length=3, num_frames=13, grid_h=1, grid_w=1)
  np.testing.assert_array_equal(one.reverse(np.arange(16), axis=0)[:3], [0, 1, 2])


def _numpy_attention(sd, x, num_text, num_frames, grid, H, eps=1e-6):
  """Reference in float64: projections, per-head LayerNorm, RoPE on video, softmax, o."""
  lin = lambda t, n: t @ sd[f"{n}.weight"].T + sd[f"{n}.bias"]
  S, D = x.shape
  d = D // H

  def head_norm(t, n):
    t = t.reshape(S, H, d)
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + eps)
    return t * sd[f"{n}.weight"] + sd[f"{n}.bias"]

  q, k = head_norm(lin(x, "q"), "q_norm"), head_norm(lin(x, "k"), "k_norm")
  v = lin(x, "v").reshape(S, H, d)
  q[num_text:] = numpy_rope(q[num_text:], d, num_frames, *grid)
  k[num_text:] = numpy_rope(k[num_text:], d, num_frames, *grid)
  logits = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return lin(np.einsum("hqk,khd->qhd", p, v).reshape(S, D), "o")


@pytest.mark.parametrize("variant", ["local_attention", "full_attention"])
def test_attention_variants_match_float64_reference(variant):
  config, model = _model(9, variant)
  graphdef, state = nnx.split(model.layers)
  block = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state)).seq_modeling_block
  sd = {k: np.asarray(v, np.float64) for k, v in convert.state_dict(block).items()}
  lay = config_lib.sequence_layout(config)
  n, L, P, T = lay.num_chunks, lay.text_length, lay.tokens_per_frame, lay.num_frames
  rng = np.random.default_rng(3)
  xt = rng.normal(size=(n * L, 64))
  xv = rng.normal(size=(T * P, 64))
  v, t = block(jnp.asarray(xv[None], jnp.float32), jnp.asarray(xt[None], jnp.float32), lay)
  grid, H = (lay.grid_h, lay.grid_w), config.model.num_heads
  if variant == "full_attention":
    y = _numpy_attention(sd, np.concatenate([xt, xv]), n * L, T, grid, H)
    want_t, want_v = y[:n * L], y[n * L:]
  else:
    want_t, acc, cnt = np.zeros_like(xt), np.zeros((T, P, 64)), np.zeros(T)
    for i in range(n):
      frames = xv.reshape(T, P, 64)[12 * i:12 * i + 13].reshape(-1, 64)
      y = _numpy_attention(sd, np.concatenate([xt[i * L:(i + 1) * L], frames]), L, 13, grid, H)
      want_t[i * L:(i + 1) * L] = y[:L]
      acc[12 * i:12 * i + 13] += y[L:].reshape(13, P, 64)
      cnt[12 * i:12 * i + 13] += 1
    want_v = (acc / cnt[:, None, None]).reshape(T * P, 64)
  assert rel_err(t[0], want_t) < 1e-5 and rel_err(v[0], want_v) < 1e-5


def test_gates_at_zero_remove_the_ttt_branch():
  """With all four gates 0 the TTT model is the local-attention model with the same weights."""
  config, model = _model(9, "ttt_mlp")
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[-1] == "gating_alpha":
      var[...] = jnp.zeros_like(var[...])
  local_config = get_config("seconds=9,variant=local_attention")
  local = DiT.from_config(local_config, rngs=nnx.Rngs(5))
  sd = {k: v for k, v in convert.state_dict(model).items() if ".ssm." not in k and "gating" not in k}
  convert.load_state_dict(local, sd)
  args = _inputs(config)
  out, ref = model(*args), local(*args)
  assert rel_err(out, ref) < 1e-6
  # ... and with the gates back the TTT branch changes the output.
  _, gated = _model(9, "ttt_mlp")
  assert rel_err(gated(*args), ref) > 1e-2


@pytest.mark.parametrize("variant", ["ttt_mlp", "ttt_linear"])
def test_three_scene_forward_and_gradients_are_finite(variant):
  config, model = _model(9, variant)
  video, text, t = _inputs(config)

  def loss(m):
    return jnp.mean(jnp.square(m(video, text, t) - video))

  value, grads = jax.jit(nnx.value_and_grad(loss))(model)
  assert np.isfinite(value)
  for path, g in nnx.to_flat_state(grads):
    g = np.asarray(g[...])
    assert np.all(np.isfinite(g)), path
    assert np.any(g != 0), path  # every parameter, TTT and gates included, gets a gradient


@pytest.mark.parametrize("remat_policy", ["none", "full"])
def test_scan_over_layers_equals_unrolled_loop(remat_policy):
  config, scanned = _model(3, "ttt_mlp", remat_policy=remat_policy)
  _, unrolled = _model(3, "ttt_mlp", remat_policy=remat_policy, scan_layers=False)
  args = _inputs(config, batch=1)
  loss = lambda m: jnp.sum(m(*args) ** 2)
  (a, ga), (b, gb) = (jax.jit(nnx.value_and_grad(loss))(m) for m in (scanned, unrolled))
  assert rel_err(a, b) < 1e-6
  for (path, x), (_, y) in zip(nnx.to_flat_state(ga), nnx.to_flat_state(gb)):
    assert rel_err(x[...], y[...]) < 1e-5, path


def test_pallas_splash_attention_matches_xla():
  """The TPU backend (splash attention, interpret mode here) on a padded window."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 96, 2, 16)), jnp.float32) for _ in range(3))
  ref = attention.dot_product_attention(q, k, v, backend="xla")
  out = attention.dot_product_attention(q, k, v, backend="pallas_tpu")
  assert rel_err(out, ref) < 1e-5


def test_chunked_xla_attention_equals_one_block():
  """Long sequences run in query blocks (padded remainder); values and gradients unchanged."""
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 100, 2, 16)), jnp.float32) for _ in range(3))
  scale = 16 ** -0.5
  loss = lambda chunk: lambda q, k, v: jnp.sum(
      jnp.sin(attention._xla_attention(q, k, v, scale, chunk)))
  for chunk in (32, 100):  # 4 blocks with a padded last one; exactly one block
    np.testing.assert_allclose(attention._xla_attention(q, k, v, scale, chunk),
                               attention._xla_attention(q, k, v, scale, 1000), rtol=1e-6,
                               atol=1e-6)
    got = jax.grad(loss(chunk), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(1000), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
      assert rel_err(g, w) < 1e-5


def test_padded_attention_equals_unpadded():
  """The cuDNN path pads windows to a multiple of 64 and masks the pad (run here with the xla
  implementation of the same call): values and gradients equal the unpadded attention."""
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.normal(size=(3, 101, 2, 16)), jnp.float32) for _ in range(3))
  scale = 16 ** -0.5
  ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
  pad = lambda q, k, v: attention.padded_attention(q, k, v, scale=scale, implementation="xla")
  assert rel_err(pad(q, k, v), ref(q, k, v)) < 1e-5
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  for g, w in zip(jax.grad(loss(pad), argnums=(0, 1, 2))(q, k, v),
                  jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
    assert rel_err(g, w) < 1e-5


def test_kernel_attention_runs_per_shard_under_a_mesh():
  """Splash attention (interpret mode off TPU) inside `use_rules` runs in a shard_map over the
  windows and heads; it equals the xla backend on the same mesh."""
  from ttt_jax import sharding
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.normal(size=(4, 96, 4, 16)), jnp.float32) for _ in range(3))
  rules = get_config("").sharding.rules
  mesh = sharding.make_mesh((2, 2, 2))
  assert sharding.target_platform() == jax.default_backend()
  outs = {}
  for backend in ("xla", "pallas_tpu"):
    def f(q, k, v):
      assert sharding.target_platform() == "cpu"  # the mesh's devices
      return attention.dot_product_attention(q, k, v, backend=backend)
    outs[backend] = sharding.jit_sharded(f, mesh, rules)(q, k, v)
  assert rel_err(outs["pallas_tpu"], outs["xla"]) < 1e-5


def test_cudnn_attention_needs_bfloat16():
  config = get_config("")
  config.model.attention_backend = "cudnn"
  with pytest.raises(config_lib.ConfigError,
                     match=r"model.attention_backend.*model.dtype=bfloat16 or attention_backend=xla"):
    config_lib.validate(config)
  config.model.dtype = "bfloat16"
  config_lib.validate(config)


def test_bad_inputs_name_the_argument():
  config, model = _model(3, "local_attention")
  video, text, t = _inputs(config, batch=1)
  with pytest.raises(ValueError, match=r"video must be \[B, T, C=12, H, W\]"):
    model(video[:, :, :3], text, t)
  with pytest.raises(ValueError, match=r"text must be \[B=1, n, L, text_dim=32\]"):
    model(video, text[..., :5], t)
  with pytest.raises(ValueError, match="num_frames = num_chunks"):
    model(video[:, :12], text, t)
