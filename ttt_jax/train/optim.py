"""Upstream's optimiser (spec 6.2, 6.3): adapter masks, four AdamW groups, schedules, clipping.

Parameters are grouped by their upstream (PyTorch) names, `ttt_jax.checkpoint.names`, so the
substring rules are upstream's own:

  frozen      not trainable under `train.adapter` (sft: none; qkvo: all but the sequence
              block; none: as qkvo, and q_norm / k_norm frozen too)
  ttt_*       name contains "ttt" or "ssm" -> peak lr `train.lr_ttt`, schedule `lr_ttt_schedule`
  other_*     everything else             -> peak lr `train.lr`,     schedule `lr_schedule`
  *_decay     AdamW weight decay `train.weight_decay`; *_nodecay: names with bias/norm/b1/b2

Gradients of frozen parameters are dropped before anything reads them (XLA then never computes
them), the global norm for clipping is over the trainable ones, and frozen parameters get no
optimiser state and stay bit-identical.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from ttt_jax.checkpoint import names

ADAPTERS = ("sft", "qkvo", "none")
SCHEDULES = ("linear", "cosine", "constant")
GROUPS = ("ttt_decay", "ttt_nodecay", "other_decay", "other_nodecay")


def trainable(torch_name: str, adapter: str) -> bool:
  """Whether the parameter named `torch_name` (upstream) is trained under `adapter`."""
  if adapter == "sft":
    return True
  if ".seq_modeling_block." not in torch_name:  # embeddings, adaLN, norms, MLPs, final layer
    return False
  return adapter == "qkvo" or not any(n in torch_name for n in (".q_norm.", ".k_norm."))


def label(path: tuple[str, ...], adapter: str) -> str:
  """The optimiser group of the parameter at `path` (our nnx path)."""
  name = names.torch_name(tuple(map(str, path)))
  if not trainable(name, adapter):
    return "frozen"
  lower = name.lower()
  kind = "ttt" if ("ttt" in lower or "ssm" in lower) else "other"
  decay = not any(s in lower for s in ("bias", "norm", "b1", "b2"))
  return f"{kind}_{'decay' if decay else 'nodecay'}"


def labels(params, adapter: str):
  """Same structure as `params` (a pure dict of our parameters), each leaf its group label."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: label(tuple(getattr(k, "key", k) for k in p), adapter), params)


def schedule(peak: float, end: float, warmup: int, total: int, kind: str):
  """lr(step), 0-based optimiser step (spec 6.3): linear warmup (s+1)/W, then decay to `end`."""
  def lr(step):
    s = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((s - warmup) / max(1, total - warmup), 0.0, 1.0)
    if kind == "linear":
      after = peak * (1.0 - progress * (1.0 - end / peak))
    elif kind == "cosine":
      after = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    else:
      after = jnp.asarray(peak, jnp.float32)
    return jnp.where(s < warmup, peak * (s + 1.0) / max(1, warmup), after)
  return lr


def schedules(train_config) -> dict:
  """{'ttt': lr(step), 'other': lr(step)} from the `train` config."""
  c = train_config
  return {"ttt": schedule(c.lr_ttt, c.lr_end, c.warmup_steps, c.steps, c.lr_ttt_schedule),
          "other": schedule(c.lr, c.lr_end, c.warmup_steps, c.steps, c.lr_schedule)}


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """g * min(1, max_norm / (||g|| + 1e-6)), as torch's clip_grad_norm_ (spec 6.3)."""
  def update(updates, state, params=None):
    del params
    scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
    return jax.tree.map(lambda g: g * scale, updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _adamw(lr, decay: float, c) -> optax.GradientTransformation:
  # optax's order equals torch's decoupled AdamW: p - lr * (adam(g) + wd * p)
  # = p * (1 - lr * wd) - lr * adam(g), with eps added to sqrt(v_hat).
  return optax.chain(optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps),
                     optax.add_decayed_weights(decay),
                     optax.scale_by_learning_rate(lr))


def make_optimizer(params, train_config) -> tuple[optax.GradientTransformation, object]:
  """The AdamW of the `train` config for `params` -> (optimizer, labels).

  The optimizer sees trainable gradients only: apply it to `trainable_part(grads, labels)`.
  """
  c = train_config
  if c.adapter not in ADAPTERS:
    raise ValueError(f"train.adapter={c.adapter!r}: use one of {ADAPTERS}.")
  lrs = schedules(c)
  tree_labels = labels(params, c.adapter)
  groups = {g: _adamw(lrs[g.split("_")[0]], c.weight_decay if g.endswith("_decay") else 0.0, c)
            for g in GROUPS}
  groups["frozen"] = optax.set_to_zero()
  return optax.chain(clip_by_global_norm(c.grad_clip),
                     optax.multi_transform(groups, tree_labels)), tree_labels


def trainable_part(grads, tree_labels):
  """Frozen gradients replaced by zeros (so clipping's norm covers trainable ones only)."""
  return jax.tree.map(lambda g, l: jnp.zeros_like(g) if l == "frozen" else g, grads,
                      tree_labels)
