"""One training step and one eval step, as small pure functions of the train state and a batch.

Randomness is explicit and never reused: a run has one base key, PRNGKey(train.seed), and step s uses
`fold_in(base, s)`, split into a batch key and a dropout key, so a resumed run draws exactly the
batches and dropout masks of an uninterrupted one. The batch comes from a `BatchSource`
(gpt_jax/data/batches.py): cut on the device from a resident split, or read from token shards.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from gpt_jax import optim
from gpt_jax.config import ModelConfig
from gpt_jax.data import batches as batches_lib
from gpt_jax.model import GPT
from gpt_jax.parallel import mesh as mesh_lib
from gpt_jax.training import layer_stats as layer_stats_lib

# draw(inputs, key, rows) -> (x, y): a BatchSource's `draw`, called inside the jitted step.
Draw = Callable[[Any, jax.Array, int], tuple[jax.Array, jax.Array]]


class TrainState(train_state.TrainState):
  """params, opt_state, step (from Flax's TrainState) plus the run's base PRNG key."""
  key: jax.Array


def init_train_state(model_cfg: ModelConfig, train_cfg: ml_collections.ConfigDict,
                     mesh: Optional[jax.sharding.Mesh] = None) -> TrainState:
  """Fresh parameters (GPT-2 init) and optimizer state; step 0. With a `mesh`, the state is born with
  its shardings: each device computes only its own slice, so no device ever holds a too-big model."""
  model = GPT(model_cfg)
  tx = optim.make_optimizer(train_cfg)

  def init():  # No arguments: the keys are made inside, so nothing needs placing on devices first.
    base = jax.random.PRNGKey(train_cfg.seed)
    init_key = jax.random.fold_in(base, -1 & 0xFFFFFFFF)  # Distinct from every step's key.
    params = model.init(init_key, jnp.zeros((1, model_cfg.block_size), jnp.int32))['params']
    # Flax's step 0 is a Python int, which jit makes a weakly typed int32; a restored step is a plain
    # int32, so a resumed run compiled another train step than a fresh one (no compilation cache hit).
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, key=base).replace(
        step=jnp.zeros((), jnp.int32))

  if mesh is None:
    return jax.jit(init)()
  shardings = mesh_lib.state_shardings(jax.eval_shape(init), mesh)
  return jax.jit(init, out_shardings=shardings)()


def accurate_mean(v: jax.Array) -> jax.Array:
  """jnp.mean(v), corrected by one pass over the residuals v - mean: XLA's float32 mean of the B*T
  per-token losses is a few ulp off, more than PyTorch's. The correction is under stop_gradient, so
  the gradient is exactly jnp.mean's (1/n per element)."""
  m = jnp.mean(v)
  return m + jax.lax.stop_gradient(jnp.mean(v - m))


def loss_fn(params: Any, model: GPT, x: jax.Array, y: jax.Array, dropout_key: Optional[jax.Array],
            ) -> jax.Array:
  """Mean next-token cross-entropy (float32). Dropout is on iff a key is given."""
  logits = model.apply({'params': params}, x, deterministic=dropout_key is None,
                       rngs=None if dropout_key is None else {'dropout': dropout_key})
  return accurate_mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def gradients(params: Any, x: jax.Array, y: jax.Array, dropout_key: jax.Array, *, model: GPT,
              batch_size: int, grad_accum_steps: int, mesh: Optional[jax.sharding.Mesh] = None,
              ) -> tuple[jax.Array, Any]:
  """(mean loss, mean gradients) of one step's batch x, y: (batch_size * grad_accum_steps, T), split into
  consecutive micro-batches of `batch_size`: the same gradients as one big batch (up to summation order)."""
  T = model.config.block_size
  if mesh is not None and grad_accum_steps == 1:
    x, y = (mesh_lib.constrain_batch(a, mesh_lib.batch_sharding(mesh)) for a in (x, y))
  grad_fn = jax.value_and_grad(loss_fn)
  use_dropout = model.config.dropout > 0
  full_params = mesh_lib.gather_for_compute(params, mesh)  # FSDP: whole weights to compute.

  def micro(i, xb, yb):
    loss, grads = grad_fn(full_params, model, xb, yb,
                          jax.random.fold_in(dropout_key, i) if use_dropout else None)
    return loss, mesh_lib.reduce_gradients(grads, mesh)

  if grad_accum_steps == 1:
    return micro(0, x, y)
  xs, ys = (a.reshape(grad_accum_steps, batch_size, T) for a in (x, y))  # (micro-batches, B, T)
  if mesh is not None:  # Each micro-batch is split over all devices, not micro-batch i on device i.
    xs, ys = (mesh_lib.constrain_batch(a, mesh_lib.batch_sharding(mesh, leading=1)) for a in (xs, ys))

  def body(acc, inp):
    loss, grads = micro(*inp)
    return jax.tree_util.tree_map(jnp.add, acc, (loss, grads)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, params))
  (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps), xs, ys))
  return jax.tree_util.tree_map(lambda a: a / grad_accum_steps, (loss, grads))


def _resident(model: GPT) -> Draw:
  """The draw of a device-resident token split: random windows of the model's block size."""
  return lambda data, key, rows: batches_lib.get_batch(data, key, rows, model.config.block_size)


def step_keys(state: TrainState) -> tuple[jax.Array, jax.Array]:
  """(batch key, dropout key) of the state's step: fold_in(base, step), split in two."""
  batch_key, dropout_key = jax.random.split(jax.random.fold_in(state.key, state.step))
  return batch_key, dropout_key


def train_step(state: TrainState, inputs: Any, *, model: GPT, batch_size: int,
               grad_accum_steps: int, schedule: Callable[[Any], Any], draw: Optional[Draw] = None,
               layer_stats: bool = False, mesh: Optional[jax.sharding.Mesh] = None,
               ) -> tuple[TrainState, dict]:
  """One optimizer update: get the step's batch, average gradients over micro-steps, apply.

  `inputs` is a BatchSource's `train_inputs(step)` and `draw` its `draw` (none: `inputs` is a resident
  token split, cut by `batches.get_batch`). `layer_stats` (a separately compiled variant) adds per-layer
  statistics to the metrics (layer_stats.py). With a `mesh` every device works on its own rows and XLA
  turns the mean over rows into an all-reduce of the gradients; FSDP: see gpt_jax/parallel/mesh.py.
  """
  batch_key, dropout_key = step_keys(state)
  x, y = (draw or _resident(model))(inputs, batch_key, batch_size * grad_accum_steps)
  loss, grads = gradients(state.params, x, y, dropout_key, model=model, batch_size=batch_size,
                          grad_accum_steps=grad_accum_steps, mesh=mesh)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'lr': schedule(state.step)}
  new_state = state.apply_gradients(grads=grads)
  if layer_stats:  # A Python-level switch: the plain step's program is exactly what it was without it.
    metrics['layer_stats'] = layer_stats_lib.layer_stats(model.config, state.params, new_state.params,
                                                         grads, x)
  return new_state, metrics


def eval_step(params: Any, inputs: Any, key: jax.Array, *, model: GPT, batch_size: int,
              draw: Optional[Draw] = None, mesh: Optional[jax.sharding.Mesh] = None) -> jax.Array:
  """Mean loss (dropout off) of one eval batch: `draw(inputs, key, batch_size)` (as train_step)."""
  x, y = (draw or _resident(model))(inputs, key, batch_size)
  if mesh is not None:
    x, y = (mesh_lib.constrain_batch(a, mesh_lib.batch_sharding(mesh)) for a in (x, y))
  return loss_fn(mesh_lib.gather_for_compute(params, mesh), model, x, y, None)
