"""Checkpoint files: lazy, code-free tensor readers and a safetensors writer."""

from ttt_jax.checkpoint.tensor_files import (CheckpointError, TensorInfo, TensorSource,
                                             open_tensors, save_safetensors)

__all__ = ["CheckpointError", "TensorInfo", "TensorSource", "open_tensors", "save_safetensors"]
