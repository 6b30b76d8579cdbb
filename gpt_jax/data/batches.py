"""Batch sources: where a training or eval step gets its (x, y) batch.

One `train_step` and one `eval_step` (gpt_jax/training/step.py) serve both data formats: each step
takes a source's `train_inputs(step)` / `eval_inputs(split, i)` as a jitted argument and calls its
`draw(inputs, key)` inside the jitted computation. `ResidentBatches`: the in-memory splits, put on
every device once and cut into random windows with the step's batch key (no host->device copy per
step). `ShardBatches`: token shards on disk (gpt_jax/data/shards.py), for corpora too big to
replicate; each process reads its own rows, drawn from (seed, step) by the shards themselves.
Either way a batch is a pure function of (train.seed, step), so a resumed run sees exactly the batches
of an uninterrupted one. Eval batches come from a stream of their own, the same at every eval.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.errors import UserError
from gpt_jax.parallel import mesh as mesh_lib

EVAL_KEY_SALT = 0x5EED  # Eval batches come from their own key stream, fixed for the whole run.


def get_batch(data: jax.Array, key: jax.Array, batch_size: int,
              block_size: int) -> tuple[jax.Array, jax.Array]:
  """Draws `batch_size` random windows from a device-resident token array (jit-friendly): inputs x and
  next-token targets y, both (batch_size, block_size) int32."""
  if data.shape[0] < block_size + 1:
    raise UserError(f'the data has only {data.shape[0]} tokens, fewer than block_size + 1 = '
                    f'{block_size + 1}; use a smaller model.block_size or more text.')
  starts = jax.random.randint(key, (batch_size,), 0, data.shape[0] - block_size)
  windows = jax.vmap(lambda s: jax.lax.dynamic_slice(data, (s,), (block_size + 1,)))(starts)
  windows = windows.astype(jnp.int32)  # (B, T + 1)
  return windows[:, :-1], windows[:, 1:]


def to_device(tokens: np.ndarray) -> jax.Array:
  """Puts a whole token split on the default device once (2 bytes per token as uint16)."""
  return jnp.asarray(np.asarray(tokens))


class BatchSource(Protocol):
  """What the training loop needs from a data format."""
  rows: int        # Rows of a training step's batch: batch_size * grad_accum_steps.
  eval_rows: int   # Rows of an eval batch: batch_size.

  def train_inputs(self, step: int) -> Any:
    """The jitted train step's data argument for `step` (a pytree of global arrays)."""

  def eval_inputs(self, split: str, i: int) -> Any:
    """The jitted eval step's data argument for eval batch `i` of `split` ('train' or 'val')."""

  def input_shardings(self, mesh: jax.sharding.Mesh) -> Any:
    """Shardings of those arguments (the same pytree structure)."""

  def draw(self, inputs: Any, key: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """Inside jit: (x, y), each (rows, T) int32, from `inputs` and the step's batch key."""


class ResidentBatches:
  """Batches cut on the device from whole token splits that live there for the whole run, replicated
  (2 bytes per token), so each device cuts its own rows and no host feeds anything per step."""

  def __init__(self, splits: dict[str, np.ndarray], block_size: int, batch_size: int,
               grad_accum_steps: int, mesh: Optional[jax.sharding.Mesh] = None):
    self.splits = {name: mesh_lib.put_replicated(tokens, mesh) if mesh is not None
                   else to_device(tokens) for name, tokens in splits.items()}
    self.block_size = block_size
    self.rows, self.eval_rows = batch_size * grad_accum_steps, batch_size

  def train_inputs(self, step: int) -> jax.Array:
    return self.splits['train']

  def eval_inputs(self, split: str, i: int) -> jax.Array:
    return self.splits[split]

  def input_shardings(self, mesh: jax.sharding.Mesh) -> Any:
    return mesh_lib.replicated(mesh)

  def draw(self, inputs: jax.Array, key: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    return get_batch(inputs, key, rows, self.block_size)


class ShardBatches:
  """Batches read from token shards on disk (gpt_jax/data/shards.py): each process reads its own rows of
  the step's global batch; dispatch is asynchronous, so it reads step k + 1's while step k computes."""

  def __init__(self, splits: Any, block_size: int, batch_size: int, grad_accum_steps: int,
               seed: int, mesh: jax.sharding.Mesh):
    self.train = splits.train
    eval_seed = seed + (EVAL_KEY_SALT << 32)  # Never a (32-bit) training seed's stream.
    self.eval_sets = {'train': splits.train.with_seed(eval_seed),
                      'val': splits.val.with_seed(eval_seed)}
    self.block_size = block_size
    self.rows, self.eval_rows = batch_size * grad_accum_steps, batch_size
    self.sharding = mesh_lib.batch_sharding(mesh)

  def train_inputs(self, step: int) -> tuple[jax.Array, jax.Array]:
    return self.train.global_batch(step, self.rows, self.block_size, self.sharding)

  def eval_inputs(self, split: str, i: int) -> tuple[jax.Array, jax.Array]:
    return self.eval_sets[split].global_batch(i, self.eval_rows, self.block_size, self.sharding)

  def input_shardings(self, mesh: jax.sharding.Mesh) -> Any:
    return (self.sharding, self.sharding)

  def draw(self, inputs: tuple[jax.Array, jax.Array], key: jax.Array,
           rows: int) -> tuple[jax.Array, jax.Array]:
    del key, rows  # The shards drew this batch for (seed, step) already.
    return inputs
