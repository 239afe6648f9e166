"""Oracle (runs under torch in .venv-oracle): a tiny random transformers T5EncoderModel, T5 ids.

  python t5_encoder.py OUT_DIR SPEC_JSON

SPEC_JSON keys (each part optional):
  model: {vocab_size, d_model, d_kv, d_ff, num_layers, num_heads,
          relative_attention_num_buckets, relative_attention_max_distance, seed, input_ids}
    -> OUT_DIR/model/ (config.json + model.safetensors from `save_pretrained`) and
       OUT_DIR/model_out.npy: the float32 last_hidden_state for input_ids [B, L], no mask,
       and model_out_bf16.npy: that of the model cast to bfloat16.
  buckets: [{num_buckets, max_distance, positions: [...]}, ...] -> OUT_DIR/buckets_{i}.npy
    (HF's `_relative_position_bucket`, bidirectional).
  tokenizer: {spiece, texts, length, extra_ids} -> OUT_DIR/token_ids.npy [len(texts), length]:
    transformers' T5Tokenizer with `add_tokens(["<end_scene>", "<start_scene>"])`, padding to
    max_length with truncation. transformers 5 has only the `tokenizers`-backed T5Tokenizer and
    converting spiece.model needs protobuf, so the Unigram vocabulary is read with sentencepiece.
  xxl_param_count: true -> stdout JSON {"xxl_params": n} of T5EncoderModel(xxl) on meta device.
"""

import json
import pathlib
import sys

import numpy as np
import torch
from transformers import T5Config, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

out_dir, spec = pathlib.Path(sys.argv[1]), json.loads(sys.argv[2])
report = {}

if "model" in spec:
  m = dict(spec["model"])
  seed, input_ids = m.pop("seed", 0), m.pop("input_ids")
  torch.manual_seed(seed)
  config = T5Config(**m, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                    use_cache=False, dropout_rate=0.0, tie_word_embeddings=False)
  model = T5EncoderModel(config).eval()
  with torch.no_grad():  # move every tensor off its init (norm weights 1, ...)
    for p in model.parameters():
      p.mul_(1 + 0.1 * torch.randn_like(p)).add_(0.02 * torch.randn_like(p))
  model.save_pretrained(out_dir / "model", safe_serialization=True)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(input_ids, dtype=torch.long)).last_hidden_state
  np.save(out_dir / "model_out.npy", out.float().numpy())
  with torch.no_grad():  # transformers' own bf16 error, the scale for ours
    out = model.to(torch.bfloat16)(input_ids=torch.tensor(input_ids, dtype=torch.long))
  np.save(out_dir / "model_out_bf16.npy", out.last_hidden_state.float().numpy())

if "buckets" in spec:
  for i, b in enumerate(spec["buckets"]):
    got = T5Attention._relative_position_bucket(
        torch.tensor(b["positions"], dtype=torch.long), bidirectional=True,
        num_buckets=b["num_buckets"], max_distance=b["max_distance"])
    np.save(out_dir / f"buckets_{i}.npy", got.numpy())

if "tokenizer" in spec:
  import sentencepiece as spm
  from transformers import T5Tokenizer
  t = spec["tokenizer"]
  sp = spm.SentencePieceProcessor(model_file=t["spiece"])
  vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
  tok = T5Tokenizer(vocab=vocab, extra_ids=t.get("extra_ids", 100))
  tok.add_tokens(["<end_scene>", "<start_scene>"])  # spec 5: in this order
  ids = tok(t["texts"], padding="max_length", truncation=True, max_length=t["length"]).input_ids
  np.save(out_dir / "token_ids.npy", np.asarray(ids, np.int64))
  report["scene_ids"] = tok.convert_tokens_to_ids(["<end_scene>", "<start_scene>"])

if spec.get("xxl_param_count"):
  with torch.device("meta"):
    xxl = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
                                  num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                                  is_encoder_decoder=False, tie_word_embeddings=False))
  report["xxl_params"] = sum(p.numel() for p in xxl.parameters())  # shared counted once

print(json.dumps(report))
