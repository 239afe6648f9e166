"""T5 tokenization with the scene tokens (spec 5), and the T5 text encoder the sampler calls.

`T5Tokenizer` reproduces Hugging Face's slow `T5Tokenizer` (legacy mode, as CogVideoX loads
it) after `add_tokens(["<end_scene>", "<start_scene>"])`, with sentencepiece only:

  * the text is split on the added / special token strings; each remaining piece is encoded by
    sentencepiece on its own (so the piece after a scene token starts a new word: dummy prefix);
  * ids: the sentencepiece pieces, then `extra_ids` sentinels `<extra_id_N>` (N = 0 has the
    highest id), then `<end_scene>` = pieces + extra_ids (32100 for T5), `<start_scene>` + 1;
  * `</s>` is appended; truncation to `length` keeps `</s>` last; padding with `<pad>` (id 0).

`TextEncoder` = tokenizer + `T5Encoder`: `embed(text, L) -> [L, d_model]` float32, the
interface of `ttt_jax.data.storyboard.TextEmbedder`.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm
from flax import nnx

from ttt_jax.text.t5 import T5Encoder, load_hf

SCENE_TOKENS = ("<end_scene>", "<start_scene>")  # registered in this order (spec 5)


class T5Tokenizer:
  """`T5Tokenizer(spiece_model_path_or_folder).encode(text, length) -> np.int32 [length]`."""

  def __init__(self, spiece_model_path, extra_ids: int = 100):
    path = os.fspath(spiece_model_path)
    if os.path.isdir(path):  # a HF tokenizer/ folder
      path = os.path.join(path, "spiece.model")
    self.sp = spm.SentencePieceProcessor(model_file=path)
    n = self.sp.get_piece_size()
    self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else 1
    self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
    self.end_scene_id, self.start_scene_id = n + extra_ids, n + extra_ids + 1
    self.vocab_size = n + extra_ids + len(SCENE_TOKENS)
    # Token string -> (id, strip the whitespace around it). The scene tokens and <pad>/</s>/<unk>
    # are AddedTokens without lstrip/rstrip upstream; the sentinels strip both sides.
    self._added = {SCENE_TOKENS[0]: (self.end_scene_id, False),
                   SCENE_TOKENS[1]: (self.start_scene_id, False)}
    for special in (self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id()):
      if special >= 0:
        self._added[self.sp.id_to_piece(special)] = (special, False)
    for i in range(extra_ids):
      self._added[f"<extra_id_{i}>"] = (n + extra_ids - 1 - i, True)
    # Longest first, so "<extra_id_10>" wins over "<extra_id_1>" (HF's trie does the same).
    alternatives = sorted(self._added, key=len, reverse=True)
    self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

  def tokenize(self, text: str) -> list[int]:
    """The ids of `text`, without `</s>`, truncation or padding."""
    parts = self._split.split(text)  # odd indices are added tokens
    for i in range(1, len(parts), 2):
      if self._added[parts[i]][1]:
        parts[i - 1], parts[i + 1] = parts[i - 1].rstrip(), parts[i + 1].lstrip()
    ids = []
    for i, part in enumerate(parts):
      if i % 2:
        ids.append(self._added[part][0])
      elif part:  # empty pieces are skipped upstream, not encoded to a lone "▁"
        ids.extend(self.sp.encode(part))
    return ids

  def encode(self, text: str, length: int) -> np.ndarray:
    """[length] int32: tokens, `</s>`, then pad ids; truncated keeping `</s>` last."""
    if length < 1:
      raise ValueError(f"length must be >= 1, got {length}.")
    ids = self.tokenize(text)[:length - 1] + [self.eos_id]
    out = np.full((length,), self.pad_id, np.int32)
    out[:len(ids)] = ids
    return out

  def encode_batch(self, texts, length: int) -> np.ndarray:
    """[len(texts), length] int32."""
    return np.stack([self.encode(t, length) for t in texts])


class TextEncoder:
  """T5 text conditioning: `embed(text, L) -> np.float32 [L, d_model]` (spec 5, no mask)."""

  def __init__(self, tokenizer: T5Tokenizer, encoder: T5Encoder):
    if tokenizer.vocab_size > encoder.config.vocab_size:
      raise ValueError(f"the tokenizer's ids reach {tokenizer.vocab_size - 1}, beyond the "
                       f"encoder's {encoder.config.vocab_size} embedding rows.")
    self.tokenizer, self.encoder = tokenizer, encoder
    self.text_dim = encoder.config.d_model
    graphdef, state = nnx.split(encoder)
    self._state = state
    # One compilation per (batch, length); the parameters are an argument, not a constant.
    self._apply = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).astype(jnp.float32))

  @classmethod
  def load(cls, text_encoder_path, tokenizer_path, *, dtype=jnp.bfloat16) -> "TextEncoder":
    """From HF folders, e.g. CogVideoX's `text_encoder/` and `tokenizer/`."""
    return cls(T5Tokenizer(tokenizer_path), load_hf(text_encoder_path, dtype=dtype))

  def embed_ids(self, ids) -> np.ndarray:
    """[B, L] ids -> [B, L, d_model] float32."""
    return np.asarray(self._apply(self._state, jnp.asarray(ids, jnp.int32)))

  def embed_batch(self, texts, length: int) -> np.ndarray:
    """[len(texts), length, d_model] float32."""
    return self.embed_ids(self.tokenizer.encode_batch(texts, length))

  def embed(self, text: str, length: int) -> np.ndarray:
    """[length, d_model] float32 embedding of one segment's text."""
    return self.embed_batch([text], length)[0]
