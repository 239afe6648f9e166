"""Oracle: re-saves a safetensors state dict with torch.save, nested as upstream's fine-tuned
checkpoints are ({"model": ..., "optimizer": ...}), bf16 if asked.

  python resave_torch.py IN.safetensors OUT.pt [bf16]
"""

import sys

import torch
from safetensors.torch import load_file

sd = load_file(sys.argv[1])
if len(sys.argv) > 3 and sys.argv[3] == "bf16":
  sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
# A transposed view, as a state dict built from live modules can hold.
key = next(k for k, v in sd.items() if v.ndim == 2)
sd[key] = sd[key].t().contiguous().t()
torch.save({"model": sd, "optimizer": {"step": 3}}, sys.argv[2])
