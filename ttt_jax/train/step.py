"""The sharded train step: v-prediction loss, gradient accumulation, AdamW (spec 6.3, 6.4).

  state = {"step": int32 [], "params": {...}, "opt_state": ...}   (pure pytrees, orbax-ready)
  batch = {"latents": [B, T, C, H, W] f32, "text": [B, n, L, D] f32}   (global arrays)

Everything random in a step (timesteps, noise, text dropout) is drawn from
fold_in(key(train.seed), step), so a resumed run repeats exactly what the uninterrupted run
did, and the draws do not depend on the mesh (jax's partitionable threefry).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ttt_jax import diffusion, sharding
from ttt_jax.nn.dit import DiT
from ttt_jax.train import optim


def abstract_model(config):
  """(graphdef, abstract params as a pure dict) of the config's DiT; nothing allocated."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: DiT.from_config(config,
                                                                     rngs=nnx.Rngs(0))))
  return graphdef, nnx.to_pure_dict(state)


def param_shardings(config, mesh, abstract_params):
  """NamedShardings of the parameters (pure dict) under the config's rules."""
  state = nnx.State(jax.tree.map(lambda a: nnx.Param(a), abstract_params,
                                 is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)))
  return nnx.to_pure_dict(sharding.param_shardings(state, mesh, config.sharding.rules))


def sharded_abstract_params(config, mesh):
  """(graphdef, parameters as jax.ShapeDtypeStructs carrying their shardings on `mesh`): what
  checkpoints are restored into and fresh parameters are created as."""
  graphdef, abstract = abstract_model(config)
  shardings = param_shardings(config, mesh, abstract)
  return graphdef, jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def init_params(config, mesh, seed: int = 0):
  """Freshly initialised parameters, each created in its sharding (never whole on a host)."""
  _, abstract = sharded_abstract_params(config, mesh)
  make = lambda: nnx.to_pure_dict(nnx.state(DiT.from_config(config, rngs=nnx.Rngs(seed)),
                                            nnx.Param))
  return jax.jit(make, out_shardings=jax.tree.map(lambda a: a.sharding, abstract))()


def state_shardings(config, mesh, params):
  """Shardings of the train state for `params` (arrays or abstract, already sharded).

  An optimiser-state leaf whose key path ends in a parameter's path (AdamW's mu and nu, under
  any wrapper of optax's) is placed like that parameter; counters are replicated.
  """
  optimizer, _ = optim.make_optimizer(params, config.train)
  replicated = NamedSharding(mesh, PartitionSpec())
  by_path = {tuple(k.key for k in path): leaf.sharding
             for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}

  def place(path, leaf):
    keys = []
    for k in reversed(path):  # the trailing run of dict keys is the parameter's path
      if not isinstance(k, jax.tree_util.DictKey):
        break
      keys.insert(0, k.key)
    return by_path.get(tuple(keys), replicated) if leaf.ndim else replicated

  abstract = jax.eval_shape(optimizer.init, params)
  return {"step": replicated, "params": jax.tree.map(lambda p: p.sharding, params),
          "opt_state": jax.tree_util.tree_map_with_path(place, abstract)}


def abstract_state(config, mesh, abstract_params):
  """The train state as sharded jax.ShapeDtypeStructs (what a checkpoint is restored into)."""
  optimizer, _ = optim.make_optimizer(abstract_params, config.train)
  shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
            "opt_state": jax.eval_shape(optimizer.init, abstract_params)}
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, state_shardings(config, mesh, abstract_params))


def init_state(config, mesh, params):
  """Step 0, the given parameters and fresh AdamW moments, each in its sharding."""
  optimizer, _ = optim.make_optimizer(params, config.train)
  shardings = state_shardings(config, mesh, params)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
  return {"step": step, "params": params, "opt_state": opt_state}


def _apply_updates(params, updates, labels):
  # Frozen parameters are left untouched (not `p + 0`, which would turn -0.0 into +0.0).
  return jax.tree.map(lambda p, u, l: p if l == "frozen" else p + u.astype(p.dtype),
                      params, updates, labels)


def _micro_batches(x, count: int):
  """[B, ...] -> [count, B / count, ...]; micro-batch i holds rows i, i + count, ... so each
  keeps the batch sharding of the rows it came from."""
  return x.reshape((x.shape[0] // count, count) + x.shape[1:]).swapaxes(0, 1)


def make_train_step(config, graphdef, params_template):
  """step(state, batch) -> (state, metrics): one optimiser step over the global batch."""
  c = config.train
  optimizer, labels = optim.make_optimizer(params_template, c)
  lrs = optim.schedules(c)
  a_table = jnp.asarray(diffusion.alphas_cumprod_sqrt())  # [1000]

  def loss_fn(params, latents, text, t, noise, keep_text):
    a = a_table[t]
    x_t = diffusion.add_noise(latents, noise, a)
    text = text * keep_text[:, None, None, None].astype(text.dtype)
    prediction = nnx.merge(graphdef, params)(x_t, text, t)
    return diffusion.v_loss(prediction, latents, noise, a).mean()

  def step(state, batch):
    latents, text = batch["latents"], batch["text"]
    batch_size = latents.shape[0]
    key = jax.random.fold_in(jax.random.key(c.seed), state["step"])
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    if c.timesteps == "stratified":
      t = diffusion.stratified_timesteps(k_t, batch_size)
    else:
      t = jax.random.randint(k_t, (batch_size,), 0, diffusion.NUM_TIMESTEPS)
    noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
    keep_text = jax.random.bernoulli(k_drop, 1.0 - config.data.text_dropout, (batch_size,))
    micro = [_micro_batches(x, c.grad_accum) for x in (latents, text, t, noise, keep_text)]

    def accumulate(carry, inputs):
      loss, grads = jax.value_and_grad(loss_fn)(state["params"], *inputs)
      grads = optim.trainable_part(grads, labels)
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32),
             jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state["params"]))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, micro)
    loss, grads = jax.tree.map(lambda x: x / c.grad_accum, (loss, grads))
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    new_state = {"step": state["step"] + 1,
                 "params": _apply_updates(state["params"], updates, labels),
                 "opt_state": opt_state}
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": lrs["other"](state["step"]), "lr_ttt": lrs["ttt"](state["step"])}
    return new_state, metrics

  return step


def jit_train_step(config, mesh, graphdef, state):
  """The step jitted on `mesh`: state keeps its shardings, batches are batch-sharded, the
  old state's buffers are donated."""
  step = make_train_step(config, graphdef, state["params"])
  shardings = state_shardings(config, mesh, state["params"])
  rules = config.sharding.rules
  batch_shardings = {"latents": sharding.batch_sharding(mesh, rules, 5),
                     "text": sharding.batch_sharding(mesh, rules, 4)}
  return sharding.jit_sharded(step, mesh, rules,
                              in_shardings=(shardings, batch_shardings),
                              out_shardings=(shardings, None), donate_argnums=(0,))


def check_batch(config, mesh) -> None:
  """The global batch must split over the mesh's batch axes and the micro-batches."""
  c = config.train
  axes, ways = sharding.batch_axes(mesh, config.sharding.rules)
  if c.batch_size % c.grad_accum or (c.batch_size // c.grad_accum) % ways:
    raise ValueError(f"config.train.batch_size={c.batch_size} with train.grad_accum="
                     f"{c.grad_accum} gives micro-batches of {c.batch_size / c.grad_accum:g}, "
                     f"which must be divisible by the mesh's batch axes {axes} ({ways} ways); "
                     "change train.batch_size, train.grad_accum or sharding.mesh_shape.")

