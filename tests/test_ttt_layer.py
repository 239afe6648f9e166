"""TTTLayer against a float64 re-derivation of spec 3.3-3.7 built the way upstream builds it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from oracles import naive_ttt, numpy_rope, rel_err

from configs.default import get_config
from ttt_jax import config as config_lib
from ttt_jax.checkpoint import names as ckpt_names
from ttt_jax.checkpoint.convert import load_state_dict, state_dict
from ttt_jax.nn import TTTLayer


def _upstream_permutation(lay):
  """Pre-interleave position of each interleaved token, built as upstream's chunking does."""
  L, P, fpc = lay.text_length, lay.tokens_per_frame, lay.num_frames // lay.num_chunks
  text = [list(range(s * L, (s + 1) * L)) for s in range(lay.num_chunks)]
  video = list(range(lay.seq_text_length, lay.total_tokens))
  first = (fpc + lay.num_frames % fpc) * P
  rest = video[first:]
  step = len(rest) // (lay.num_chunks - 1)
  scenes = [video[:first]] + [rest[i * step:(i + 1) * step] for i in range(lay.num_chunks - 1)]
  return np.array([p for s in range(lay.num_chunks) for p in text[s] + scenes[s]])


def reference_layer(sd, x, lay, kind, M, base_lr, eta_layout, eps=1e-6):
  """Spec 3.3 steps 1-10 in float64 numpy, the inner loop by the jax.grad oracle."""
  B, S, D = x.shape
  H, d = sd["ttt_norm_weight"].shape
  lin = lambda t, n: t @ sd[f"{n}.weight"].T + sd[f"{n}.bias"]
  XQ, XK, XV = (lin(x, n).reshape(B, S, H, d) for n in ("wq", "wk", "wv"))
  XQ, XK = (t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12) for t in (XQ, XK))
  T0 = lay.seq_text_length
  for t in (XQ, XK):
    for b in range(B):
      t[b, T0:] = numpy_rope(t[b, T0:], d, lay.num_frames, lay.grid_h, lay.grid_w)
  y = XV - XK
  y = (y - y.mean(-1, keepdims=True)) / (y.std(-1, ddof=1, keepdims=True) + 1e-8)
  XV = sd["ttt_norm_weight"] * y + sd["ttt_norm_bias"] + XK

  gate = 1 / (1 + np.exp(-(np.einsum("bsD,hD->bsh", x, sd["learnable_ttt_lr_weight"][:, 0])
                           + sd["learnable_ttt_lr_bias"][:, 0])))
  eta_tok = base_lr * gate / d  # [B, S, H]
  N = S // M
  # Upstream's E: [B, H, N, M rows, M cols], rows equal, E[..., n, i, j] = eta(n*M + j) / M.
  E = np.repeat(eta_tok.reshape(B, N, 1, M, H).transpose(0, 4, 1, 2, 3), M, axis=3) / M
  pi = _upstream_permutation(lay) if lay.num_chunks > 1 else np.arange(S)
  E = E.reshape(B, H, S, M)[:, :, pi].reshape(B, H, N, M, M)  # rows permuted like tokens
  if eta_layout == "kernel":
    eta = E[..., -1, :]  # the kernel reads the last row
  else:
    eta = (eta_tok[:, pi] / M).reshape(B, N, M, H).transpose(0, 3, 1, 2)

  def mb(t):  # [B, S, H, d] -> [B, H, N, M, d], interleaved
    return t[:, pi].reshape(B, N, M, H, d).transpose(0, 3, 1, 2, 4)

  names = ("W1", "b1", "W2", "b2") if kind == "ttt_mlp" else ("W1", "b1")
  with jax.enable_x64(True):
    out, _ = naive_ttt(kind, mb(XQ), mb(XK), mb(XV), eta, sd["ttt_norm_weight"],
                       sd["ttt_norm_bias"], tuple(sd[n] for n in names), eps)
    out = np.asarray(out)
  out = out.transpose(0, 2, 3, 1, 4).reshape(B, S, D)
  out = (out - out.mean(-1, keepdims=True)) / np.sqrt(out.var(-1, keepdims=True) + 1e-6)
  out = lin(out * sd["post_norm.weight"] + sd["post_norm.bias"], "wo")
  result = np.empty_like(out)
  result[:, pi] = out  # undo the interleave
  return result


def _random_layer(config, seed, base_lr):
  """A layer whose parameters have O(1) effects (the init's are too small to test with)."""
  layer = TTTLayer.from_config(config, rngs=nnx.Rngs(seed))
  layer.base_lr = base_lr
  rng = np.random.default_rng(seed)
  sd = {}
  for name, value in state_dict(layer).items():
    scale = 1 / np.sqrt(value.shape[-1]) if value.ndim > 1 else 0.3
    sd[name] = rng.normal(size=value.shape) * scale
  sd["post_norm.weight"] += 1.0
  sd["ttt_norm_weight"] += 1.0
  load_state_dict(layer, sd)
  return layer, {k: np.asarray(v, np.float32).astype(np.float64) for k, v in sd.items()}


@pytest.mark.parametrize("seconds", [3, 9])
@pytest.mark.parametrize("kind", ["ttt_mlp", "ttt_linear"])
@pytest.mark.parametrize("eta_layout", ["kernel", "aligned"])
def test_layer_matches_float64_reference(kind, seconds, eta_layout):
  config = get_config(f"seconds={seconds},variant={kind}")
  config.model.ttt.eta_layout = eta_layout
  config.model.ttt.checkpoint_group = 4
  config_lib.validate(config)
  lay = config_lib.sequence_layout(config)
  layer, sd = _random_layer(config, seed=seconds, base_lr=10.0)
  x = np.random.default_rng(1).normal(size=(2, lay.total_tokens, config.model.model_dim))
  got = jax.jit(lambda m, x: m(x, lay))(layer, x.astype(np.float32))
  ref = reference_layer(sd, x.astype(np.float32).astype(np.float64), lay, kind,
                        config.model.ttt.mini_batch_size, 10.0, eta_layout)
  assert rel_err(got, ref) <= 1e-5
  # The inner update must matter for this to test anything.
  layer.base_lr = 0.0
  assert rel_err(layer(x.astype(np.float32), lay), ref) > 1e-3


def test_eta_layouts_differ_only_for_several_scenes():
  outs = {}
  for seconds in (3, 9):
    for eta_layout in ("kernel", "aligned"):
      config = get_config(f"seconds={seconds}")
      config.model.ttt.eta_layout = eta_layout
      lay = config_lib.sequence_layout(config)
      layer, _ = _random_layer(config, seed=0, base_lr=10.0)
      x = np.random.default_rng(2).normal(size=(1, lay.total_tokens, 64)).astype(np.float32)
      outs[seconds, eta_layout] = layer(x, lay)
  np.testing.assert_array_equal(outs[3, "kernel"], outs[3, "aligned"])
  assert rel_err(outs[9, "kernel"], outs[9, "aligned"]) > 1e-4


@pytest.mark.parametrize("kind, extra", [("ttt_mlp", 39_521_328), ("ttt_linear", 38_132_784)])
def test_5b_parameters_match_upstream(kind, extra):
  """Spec 1.5: names and shapes, and the per-layer count (which also holds 4 gates of 3072)."""
  config = get_config(f"preset=5b,variant={kind}")
  layer = nnx.eval_shape(lambda: TTTLayer.from_config(config, rngs=nnx.Rngs(0)))
  shapes = _upstream_shapes(layer)
  f = 256 if kind == "ttt_mlp" else 64
  expected = {
      **{f"{p}.weight": (3072, 3072) for p in ("wq", "wk", "wv", "wo")},
      **{f"{p}.bias": (3072,) for p in ("wq", "wk", "wv", "wo")},
      "W1": (48, 64, f), "b1": (48, 1, f), "ttt_norm_weight": (48, 64),
      "ttt_norm_bias": (48, 64), "learnable_ttt_lr_weight": (48, 1, 3072),
      "learnable_ttt_lr_bias": (48, 1), "post_norm.weight": (3072,), "post_norm.bias": (3072,),
  }
  if kind == "ttt_mlp":
    expected.update({"W2": (48, 256, 64), "b2": (48, 1, 64)})
  assert shapes == expected
  assert sum(np.prod(s) for s in expected.values()) + 4 * 3072 == extra


def _upstream_shapes(layer):
  """Upstream name -> upstream (PyTorch) shape, from a possibly abstract layer."""
  params = {tuple(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
  return {e.names[0]: e.torch_shape for e in ckpt_names.entries(params)}


def test_upstream_state_dict_round_trip_and_errors():
  config = get_config("")
  layer, sd = _random_layer(config, seed=3, base_lr=0.1)
  fresh = TTTLayer.from_config(config, rngs=nnx.Rngs(9))
  load_state_dict(fresh, {"ssm.ttt." + k: v for k, v in sd.items()}, prefix="ssm.ttt.")
  for k, v in state_dict(fresh).items():
    np.testing.assert_array_equal(v, np.asarray(sd[k], np.float32))
  bad = dict(sd)
  del bad["W2"]
  bad["W1"] = bad["W1"][..., :5]
  bad["wq.weight"] = bad["wq.weight"].T[:3]
  bad["extra"] = np.zeros(1)
  with pytest.raises(ValueError) as e:
    load_state_dict(fresh, bad)
  msg = str(e.value)
  assert "missing: W2" in msg and "unexpected: extra" in msg
  assert "wrong shape: W1 is (4, 16, 5), expected (4, 16, 64)" in msg
  assert "wrong shape: wq.weight is (3, 64), expected (64, 64)" in msg


def test_gradients_flow_to_every_parameter():
  config = get_config("seconds=9")
  lay = config_lib.sequence_layout(config)
  layer, _ = _random_layer(config, seed=4, base_lr=1.0)
  x = np.random.default_rng(5).normal(size=(1, lay.total_tokens, 64)).astype(np.float32)
  grads = nnx.grad(lambda m: jnp.sum(m(x, lay) ** 2))(layer)
  for path, g in nnx.to_flat_state(grads):
    g = np.asarray(g[...])
    assert np.all(np.isfinite(g)) and np.any(g != 0), path


def test_wrong_token_count_is_a_clear_error():
  config = get_config("")
  lay = config_lib.sequence_layout(config)
  layer = TTTLayer.from_config(config, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="TTTLayer got 95 tokens but the layout has 96"):
    layer(np.zeros((1, 95, 64), np.float32), lay)
