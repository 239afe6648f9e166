"""Text encoders: the Flax T5 v1.1 encoder and its tokenizer."""
