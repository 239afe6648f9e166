"""Our parameter paths <-> upstream (ttt-video-dit) and diffusers tensor names (spec 1.5, 7.1).

One rule set serves every module (the whole `DiT`, or a lone `TTTLayer` for its tests): a
parameter path such as ('layers', 'seq_modeling_block', 'ssm', 'wq', 'kernel') becomes
upstream's 'layers.{i}.seq_modeling_block.ssm.ttt.wq.weight' for every layer i, with the
tensor transformed from our layout (Linear kernels [in, out], stacked layers on axis 0, the
patch embedding as a matmul on (c, p, q)-flattened patches) to PyTorch's ([out, in], one tensor
per layer, a Conv2d weight [D, C, p, p]). diffusers' names are a pure rename of upstream's.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

# Our module names that differ from upstream's (matched on whole dotted components).
_RENAMES = (
    (r"\btime_embed_(\d)\b", r"time_embed.\1"),  # upstream: nn.Sequential(Linear, SiLU, Linear)
    (r"adaLN_modulation\.", "adaLN_modulation.1."),  # nn.Sequential(SiLU, Linear)
    (r"\bssm\b", "ssm.ttt"),  # upstream wraps the TTT layer in a bidirectional `ssm` module
)

# diffusers CogVideoXTransformer3DModel -> upstream, without `dit.` (spec 7.1). Per layer N.
DIFFUSERS_TO_UPSTREAM = (
    ("patch_embed.proj.", "patch_embedding.vid_proj."),
    ("patch_embed.text_proj.", "patch_embedding.text_proj."),
    ("time_embedding.linear_1.", "time_embed.0."),
    ("time_embedding.linear_2.", "time_embed.2."),
    ("norm1.linear.", "pre_seq_adaLN_modulation.1."),
    ("norm1.norm.", "pre_seq_layernorm."),
    ("attn1.to_q.", "seq_modeling_block.q."),
    ("attn1.to_k.", "seq_modeling_block.k."),
    ("attn1.to_v.", "seq_modeling_block.v."),
    ("attn1.to_out.0.", "seq_modeling_block.o."),
    ("attn1.norm_q.", "seq_modeling_block.q_norm."),
    ("attn1.norm_k.", "seq_modeling_block.k_norm."),
    ("norm2.linear.", "pre_mlp_adaLN_modulation.1."),
    ("norm2.norm.", "pre_mlp_layernorm."),
    ("ff.net.0.proj.", "mlp.layer1."),
    ("ff.net.2.", "mlp.layer2."),
    ("norm_final.", "transformer_norm."),
    ("norm_out.linear.", "final_layer.adaLN_modulation.1."),
    ("norm_out.norm.", "final_layer.norm."),
    ("proj_out.", "final_layer.linear."),
)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One of our parameters and the PyTorch tensor(s) it corresponds to.

  Attributes:
    path: our parameter path (nnx flat-state keys, as strings).
    names: the PyTorch names; one per layer for stacked parameters, else one.
    torch_shape: shape of each PyTorch tensor.
    to_torch: our array (one layer's slice if stacked) -> PyTorch layout.
    from_torch: PyTorch layout -> ours.
  """
  path: tuple[str, ...]
  names: tuple[str, ...]
  torch_shape: tuple[int, ...]
  to_torch: Callable[[np.ndarray], np.ndarray]
  from_torch: Callable[[np.ndarray], np.ndarray]

  @property
  def stacked(self) -> bool:
    return self.path[0] == "layers"


def torch_name(path: tuple[str, ...]) -> str:
  """Our path -> upstream name (with '{i}' for the layer index of stacked parameters)."""
  *modules, leaf = path
  if modules and modules[0] == "layers":
    modules.insert(1, "{i}")
  name = ".".join(modules + [{"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])
  for pattern, repl in _RENAMES:
    name = re.sub(pattern, repl, name)
  return name


def entries(params: dict, patch_size: int | None = None) -> list[Entry]:
  """Entries for a flat {path: array-like with .shape} of our parameters."""
  out = []
  for path, value in params.items():
    path = tuple(map(str, path))
    shape = tuple(value.shape)
    stacked = path[0] == "layers"
    layer_shape = shape[1:] if stacked else shape
    identity = lambda a: a
    to_torch, from_torch, torch_shape = identity, identity, layer_shape
    if path[-1] == "kernel" and path[-2] == "vid_proj":
      (cpp, D), p = layer_shape, patch_size
      if not p:
        raise ValueError("entries(): the patch embedding needs patch_size.")
      torch_shape = (D, cpp // (p * p), p, p)  # Conv2d [out, in, kh, kw]
      to_torch = lambda a, s=torch_shape: np.ascontiguousarray(a.T).reshape(s)
      from_torch = lambda a, s=layer_shape: np.ascontiguousarray(a.reshape(s[1], s[0]).T)
    elif path[-1] == "kernel":
      torch_shape = layer_shape[::-1]
      to_torch = from_torch = lambda a: np.ascontiguousarray(a.T)
    template = torch_name(path)
    names = tuple(template.format(i=i) for i in range(shape[0])) if stacked else (template,)
    out.append(Entry(path, names, torch_shape, to_torch, from_torch))
  return out


def diffusers_to_upstream(key: str) -> str | None:
  """diffusers tensor name -> upstream name (no `dit.`), or None if it has no counterpart."""
  m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.*)", key)
  prefix, rest = (f"layers.{m.group(1)}.", m.group(2)) if m else ("", key)
  for src, dst in DIFFUSERS_TO_UPSTREAM:
    if rest.startswith(src) and (m is not None) == (src.startswith(("norm1", "norm2", "attn1",
                                                                    "ff."))):
      return prefix + dst + rest[len(src):]
  return None
