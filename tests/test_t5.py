"""The T5 v1.1 encoder and tokenizer (spec 5) against transformers (torch, in the oracle venv).

One oracle run builds a tiny random `T5EncoderModel` (saved with `save_pretrained`), its output
on fixed ids, HF's relative-position buckets, and HF `T5Tokenizer` ids (after adding the scene
tokens) for a sentencepiece model trained here on a few sentences.
"""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from flax import nnx

from tests.oracles import rel_err
from ttt_jax.checkpoint.tensor_files import CheckpointError, open_tensors, save_safetensors
from ttt_jax.text import t5
from ttt_jax.text.tokenizer import T5Tokenizer, TextEncoder

TINY = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16)
BUCKETS = [(8, 16, 60), (32, 128, 700)]  # (num_buckets, max_distance, range of positions)
CORPUS = ["A dog runs across the green field in the morning.",
          "The cat sleeps on a warm red sofa while rain falls outside.",
          "Tom and Jerry chase each other through the kitchen and the garden.",
          "A bright sun rises over the quiet town; birds sing in the trees.",
          "Jerry hides behind the cheese while Tom looks around the corner.",
          "Rain falls on the old wooden house at night, and the lights go out."]
TEXTS = ["A dog runs across the green field.",
         "<start_scene>Tom chases Jerry.<end_scene>",
         "The cat sleeps <end_scene>  <start_scene> on a warm sofa",
         "<start_scene> Jerry hides.",
         "Tom looks around the corner and Jerry hides behind the cheese in the old house.",
         "",
         "  rain   falls  ",
         "Qxz 7 ☃ unknown",
         "Tom</s>Jerry<pad>"]
LENGTH = 16


@pytest.fixture(scope="module")
def oracle(run_oracle, tmp_path_factory):
  out = tmp_path_factory.mktemp("t5")
  (out / "corpus.txt").write_text("\n".join(CORPUS * 4))
  # T5's special-id layout: <pad> 0, </s> 1, <unk> 2, no <s>.
  spm.SentencePieceTrainer.train(input=str(out / "corpus.txt"), model_prefix=str(out / "spiece"),
                                 vocab_size=70, model_type="unigram", pad_id=0, eos_id=1,
                                 unk_id=2, bos_id=-1, minloglevel=2)
  ids = np.random.default_rng(0).integers(3, TINY["vocab_size"], size=(2, 24))
  ids[0, 15:] = 0  # a padded row: pads attend and are attended to (no mask)
  ids[1, -1] = 1
  spec = {"model": {**TINY, "seed": 0, "input_ids": ids.tolist()},
          "buckets": [{"num_buckets": n, "max_distance": d, "positions": list(range(-r, r + 1))}
                      for n, d, r in BUCKETS],
          "tokenizer": {"spiece": str(out / "spiece.model"), "texts": TEXTS, "length": LENGTH},
          "xxl_param_count": True}
  report = json.loads(run_oracle("t5_encoder.py", out, json.dumps(spec)).strip().splitlines()[-1])
  return dict(dir=out, ids=ids, report=report, out=np.load(out / "model_out.npy"),
              out_bf16=np.load(out / "model_out_bf16.npy"),
              buckets=[np.load(out / f"buckets_{i}.npy") for i in range(len(BUCKETS))],
              token_ids=np.load(out / "token_ids.npy"))


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_matches_transformers(oracle, dtype, tol):
  model = t5.load_hf(oracle["dir"] / "model", dtype=dtype)
  assert model.config == t5.T5Config(**TINY)
  out = np.asarray(model(jnp.asarray(oracle["ids"])).astype(jnp.float32))
  err = rel_err(out, oracle["out"])
  print(f"T5 {jnp.dtype(dtype).name} rel err {err:.2e}, transformers bf16 "
        f"{rel_err(oracle['out_bf16'], oracle['out']):.2e}")
  assert err <= tol
  if dtype == jnp.bfloat16:  # and no worse than transformers' own bf16 rounding
    assert err <= 1.5 * rel_err(oracle["out_bf16"], oracle["out"])


def test_sharded_folder_and_file(oracle, tmp_path):
  """A sharded folder with an index (CogVideoX's text_encoder/ layout) loads the same."""
  folder = oracle["dir"] / "model"
  with open_tensors(folder) as src:
    tensors = {k: v.load() for k, v in src.items()}
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for file, keys in shards.items():
    save_safetensors(tmp_path / file, {k: tensors[k] for k in keys})
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
  shutil.copy(folder / "config.json", tmp_path / "config.json")
  ids = jnp.asarray(oracle["ids"])
  a = t5.load_hf(tmp_path, dtype=jnp.float32)(ids)
  b = t5.load_hf(folder / "model.safetensors", dtype=jnp.float32)(ids)  # config.json beside it
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _bucket_reference(rel, num_buckets, max_distance):
  """Mesh TensorFlow's rule, one Python int at a time (float32 log, as torch computes it)."""
  half = num_buckets // 2
  base, n = (half if rel > 0 else 0), abs(rel)
  max_exact = half // 2
  if n < max_exact:
    return base + n
  large = (np.log(np.float32(n) / np.float32(max_exact)) / np.float32(math.log(max_distance /
           max_exact)) * np.float32(half - max_exact))
  return base + min(max_exact + int(large), half - 1)


@pytest.mark.parametrize("case", range(len(BUCKETS)))
def test_relative_position_buckets(oracle, case):
  num_buckets, max_distance, r = BUCKETS[case]
  rel = np.arange(-r, r + 1)
  ours = t5.relative_position_bucket(rel, num_buckets=num_buckets, max_distance=max_distance)
  ref = [_bucket_reference(int(x), num_buckets, max_distance) for x in rel]
  np.testing.assert_array_equal(ours, ref)
  np.testing.assert_array_equal(ours, oracle["buckets"][case])  # transformers' own function
  assert ours.min() == 0 and ours.max() == num_buckets - 1


def test_tokenizer_matches_transformers(oracle):
  tok = T5Tokenizer(oracle["dir"] / "spiece.model")
  n = tok.sp.get_piece_size()
  assert oracle["report"]["scene_ids"] == [n + 100, n + 101] == [tok.end_scene_id,
                                                                  tok.start_scene_id]
  ours = tok.encode_batch(TEXTS, LENGTH)
  assert ours.dtype == np.int32 and ours.shape == (len(TEXTS), LENGTH)
  for text, a, b in zip(TEXTS, ours, oracle["token_ids"]):
    assert a.tolist() == b.tolist(), text
  long = ours[4]
  assert long[-1] == 1 and 0 not in long  # truncated, </s> kept last
  assert ours[TEXTS.index("")].tolist() == [1] + [0] * (LENGTH - 1)
  assert ours[1][0] == tok.start_scene_id and tok.end_scene_id in ours[1]


def test_tokenizer_real_t5_ids(oracle):
  """Sentinels count down from pieces + 99, so T5's 32000 pieces put the scene tokens at
  32100 / 32101 (spec 5)."""
  tok = T5Tokenizer(oracle["dir"] / "spiece.model")
  n = tok.sp.get_piece_size()
  assert tok.tokenize("a <extra_id_0> b")[1] == n + 99  # <extra_id_0> is the highest sentinel
  assert tok.tokenize("<extra_id_99>")[0] == n
  # A sentinel strips the spaces around it (HF: lstrip/rstrip); scene tokens do not need to.
  assert tok.tokenize("rain <extra_id_3>  falls") == tok.tokenize("rain<extra_id_3>falls")
  assert tok.vocab_size == n + 102 and tok.encode("rain", 8)[-1] == 0


def test_load_errors_name_the_bad_tensors(oracle, tmp_path):
  folder = oracle["dir"] / "model"
  with open_tensors(folder) as src:
    tensors = {k: v.load() for k, v in src.items()}
  gone = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
  bad = "encoder.block.0.layer.0.SelfAttention.q.weight"
  del tensors[gone]
  tensors[bad] = tensors[bad][:, :-1]
  save_safetensors(tmp_path / "model.safetensors", tensors)
  shutil.copy(folder / "config.json", tmp_path / "config.json")
  with pytest.raises(CheckpointError) as info:
    t5.load_hf(tmp_path, dtype=jnp.float32)
  message = str(info.value)
  assert f"missing {gone}" in message and bad in message and "[32, 31]" in message
  with pytest.raises(CheckpointError, match="config.json"):
    t5.load_hf(oracle["dir"] / "spiece.model")  # no config.json beside it
  with pytest.raises(CheckpointError, match="gated-gelu"):
    t5.T5Config.from_hf_config({**TINY, "feed_forward_proj": "relu"})


def test_xxl_parameter_count(oracle):
  c = t5.T5Config.xxl()
  inner = c.num_heads * c.d_kv
  per_layer = 4 * c.d_model * inner + 3 * c.d_model * c.d_ff + 2 * c.d_model
  expected = (c.vocab_size * c.d_model + c.num_layers * per_layer +
              c.relative_attention_num_buckets * c.num_heads + c.d_model)
  abstract = nnx.eval_shape(lambda: t5.T5Encoder(c, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert count == expected == oracle["report"]["xxl_params"] == 4_762_310_656


def test_text_encoder_embed(oracle):
  tok = T5Tokenizer(oracle["dir"] / "spiece.model")
  config = t5.T5Config(**{**TINY, "vocab_size": tok.vocab_size})
  encoder = t5.T5Encoder(config, dtype=jnp.float32, rngs=nnx.Rngs(1))
  text = TextEncoder(tok, encoder)
  assert text.text_dim == TINY["d_model"]
  one = text.embed(TEXTS[1], LENGTH)
  assert one.dtype == np.float32 and one.shape == (LENGTH, TINY["d_model"])
  direct = np.asarray(encoder(jnp.asarray(tok.encode(TEXTS[1], LENGTH))[None]))[0]
  np.testing.assert_allclose(one, direct, rtol=1e-6, atol=1e-6)
  batch = text.embed_batch(TEXTS[:3], LENGTH)
  np.testing.assert_allclose(batch[1], one, rtol=1e-6, atol=1e-6)
  small = t5.T5Encoder(t5.T5Config(**TINY), dtype=jnp.float32, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="embedding rows"):
    TextEncoder(tok, small)
