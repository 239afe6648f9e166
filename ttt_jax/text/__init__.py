"""Text encoders: the Flax T5 v1.1 encoder and its tokenizer."""

from ttt_jax.text.t5 import T5Config, T5Encoder, load_hf, relative_position_bucket
from ttt_jax.text.tokenizer import SCENE_TOKENS, T5Tokenizer, TextEncoder

__all__ = ["SCENE_TOKENS", "T5Config", "T5Encoder", "T5Tokenizer", "TextEncoder", "load_hf",
           "relative_position_bucket"]
