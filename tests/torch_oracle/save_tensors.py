"""Writes checkpoint files with torch for tests/test_tensor_files.py, plus their expected values.

usage: save_tensors.py OUT_DIR [OURS.safetensors]

OUT_DIR gets:
  sd.pt          torch.save of a state dict (nn.Linear's OrderedDict, with its _metadata) plus
                 f32 / bf16 / f16 / f8 / int64 / uint16 / bool tensors, a transposed tensor, slice
                 views with storage offsets, tensors sharing one storage, an expanded (stride 0)
                 tensor, 0-d and empty tensors, and an nn.Parameter
  nested.pt      {"model": <sd>, "optimizer": AdamW state dict after one step, "step": 3}
  mixed.pt       {"w": tensor, "step": 3, "name": "run"}
  legacy.pt      a small state dict in the pre-1.6 (non-zip) format
  single.safetensors             safetensors.torch.save_file of the contiguous-able entries
  sharded/       diffusers-style shards + diffusion_pytorch_model.safetensors.index.json
  expected.npz   every sd.pt entry: float kinds as float32 (exact), others as int64 / bool
  meta.json      {name: [torch dtype, shape]} and the names in single/sharded
With OURS given (a safetensors file written by ttt_jax), also ours.npz / ours.json: what
safetensors.torch.load_file reads from it, in the same encoding.
"""

import json
import os
import sys

import numpy as np
import safetensors.torch
import torch


def expected(t):
  if t.is_floating_point():
    return t.float().numpy()
  return t.numpy() if t.dtype == torch.bool else t.to(torch.int64).numpy()


def main(out, ours=None):
  torch.manual_seed(0)
  linear = torch.nn.Linear(4, 3)
  sd = linear.state_dict()  # an OrderedDict carrying a `_metadata` attribute (pickle BUILD)
  bf16 = torch.randn(4, 6).bfloat16()
  bf16[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
  base = torch.randn(6, 8)
  shared = torch.randn(10)
  sd.update({
      "f32": torch.randn(3, 5),
      "bf16": bf16,
      "bf16_t": torch.randn(3, 4).bfloat16().t(),
      "f16": torch.randn(7).half(),
      "f8": torch.randn(5).to(torch.float8_e4m3fn),  # UntypedStorage + _rebuild_tensor_v3
      "u16": torch.arange(0, 60000, 7000, dtype=torch.int32).to(torch.uint16),
      "i64": torch.arange(-5, 5, dtype=torch.int64) * (1 << 40),
      "mask": torch.tensor([True, False, True]),
      "transposed": torch.randn(5, 4).t(),
      "slice": base[2:5, 1:7],  # offset 17, strides (8, 1)
      "row": base[3],  # contiguous, offset 24
      "shared_a": shared[:6].view(2, 3),
      "shared_b": shared[4:],  # overlaps shared_a in the same storage
      "expanded": torch.randn(3, 1).expand(3, 4),  # stride 0
      "column": torch.randn(1, 4).t(),  # shape (4, 1), strides (1, 4)
      "scalar": torch.tensor(2.5),
      "empty": torch.zeros(0, 3),
      "param": torch.nn.Parameter(torch.randn(3, 2)),
  })
  torch.save(sd, os.path.join(out, "sd.pt"))
  params = [torch.nn.Parameter(torch.randn(2, 2))]
  optimizer = torch.optim.AdamW(params)
  params[0].sum().backward()
  optimizer.step()
  torch.save({"model": sd, "optimizer": optimizer.state_dict(), "step": 3},
             os.path.join(out, "nested.pt"))
  torch.save({"w": torch.ones(2), "step": 3, "name": "run"}, os.path.join(out, "mixed.pt"))
  torch.save({"w": torch.ones(2)}, os.path.join(out, "legacy.pt"),
             _use_new_zipfile_serialization=False)

  dense = {k: v.detach().contiguous().clone() for k, v in sd.items()}
  safetensors.torch.save_file(dense, os.path.join(out, "single.safetensors"),
                              metadata={"format": "pt"})
  names = sorted(dense)
  shards = [names[:len(names) // 2], names[len(names) // 2:]]
  os.makedirs(os.path.join(out, "sharded"))
  weight_map = {}
  for i, keys in enumerate(shards):
    name = f"diffusion_pytorch_model-{i + 1:05d}-of-00002.safetensors"
    safetensors.torch.save_file({k: dense[k] for k in keys}, os.path.join(out, "sharded", name))
    weight_map.update({k: name for k in keys})
  with open(os.path.join(out, "sharded", "diffusion_pytorch_model.safetensors.index.json"),
            "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=2)

  np.savez(os.path.join(out, "expected.npz"), **{k: expected(v.detach()) for k, v in sd.items()})
  with open(os.path.join(out, "meta.json"), "w") as f:
    json.dump({"tensors": {k: [str(v.dtype), list(v.shape)] for k, v in sd.items()},
               "dense": names}, f)

  if ours:
    loaded = safetensors.torch.load_file(ours)
    np.savez(os.path.join(out, "ours.npz"), **{k: expected(v) for k, v in loaded.items()})
    with open(os.path.join(out, "ours.json"), "w") as f:
      json.dump({k: [str(v.dtype), list(v.shape)] for k, v in loaded.items()}, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
