"""Several train steps per jitted call (`train.steps_per_call`): k updates inside one program.

A small model on a GPU spends longer in Python dispatching a step than the GPU spends computing it.
A call of k steps runs `train_step` (gpt_jax/training/step.py) k times inside one `jax.lax.scan`, so
the host dispatches once per k steps. Each step inside is the very step a call of one runs: the same
function of (state, that step's inputs), its batch and dropout keys folded from the state's own step
counter, so k steps in one call equal k calls of one step bit for bit (tests/test_steps_per_call.py).
A call of one step is `jax.jit(train_step)` itself: steps_per_call = 1 compiles the program it always did.

Inputs: a resident split (`ResidentBatches`) is one array for the whole run, passed once and cut on
the device by every step. Token shards (`ShardBatches`) read a batch per step on the host: a call gets
its k steps' batches as a tuple, stacked on the device into (k, rows, T) and scanned over.

Metrics: those of the call's last step (what the loop logs, at the step the call ends at), plus, for
k > 1, 'per_step': every step's metrics stacked, e.g. per_step['loss'] of shape (k,).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from gpt_jax.data import batches as batches_lib

StepFn = Callable[[Any, Any], tuple[Any, dict]]  # (state, inputs) -> (state, metrics)


def scan_steps(step_fn: StepFn, k: int, per_step_inputs: bool, state_sh: Any, state: Any, inputs: Any,
               ) -> tuple[Any, dict]:
  """k steps of `step_fn` as one scan: the state after them, and the last step's metrics with every
  step's under 'per_step' (each (k, ...)). `state_sh`: the state's shardings."""
  # Each step gets and returns the state laid out exactly as a call of one step does (its in and out
  # shardings). Left free, XLA partitions the loop-carried state its own way, and with FSDP the
  # updates then differ from single steps in the last bits.
  pin = lambda s: jax.lax.with_sharding_constraint(s, state_sh)

  def body(s: Any, step_inputs: Any) -> tuple[Any, dict]:
    s, metrics = step_fn(pin(s), inputs if step_inputs is None else step_inputs)
    return pin(s), metrics

  if per_step_inputs:  # A tuple of k (rows, T) batches -> (k, rows, T), scanned over.
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *inputs)
    state, per_step = jax.lax.scan(body, state, stacked)
  else:  # One array for every step: closed over, not copied k times.
    state, per_step = jax.lax.scan(body, state, None, length=k)
  return state, dict(jax.tree_util.tree_map(lambda a: a[-1], per_step), per_step=per_step)


class Steps:
  """The run's jitted calls of k steps (k = steps_per_call, or fewer: `call_length`), each compiled on
  first use: `steps(state, step, k)`.

  `step_fn` is a train_step with its settings bound; `shardings` are (the state's, the metrics'); the
  state is donated. `layer_stats=True` picks the variant with per-layer statistics (layer_stats.py).
  """

  def __init__(self, step_fn: StepFn, steps_per_call: int, source: batches_lib.BatchSource,
               mesh: jax.sharding.Mesh, shardings: tuple[Any, Any]):
    self.step_fn, self.steps_per_call, self.source = step_fn, steps_per_call, source
    self.mesh, self.shardings = mesh, shardings
    # Resident splits are the same array at every step; token shards give each step its own batch.
    self.per_step_inputs = not isinstance(source, batches_lib.ResidentBatches)
    self.calls: dict[tuple[int, bool], StepFn] = {}  # (k, layer_stats) -> its jitted call
    # (k, layer_stats) -> what waits for that call's compilation in a background thread (startup.py).
    self.pending: dict[tuple[int, bool], Callable[[], None]] = {}

  def call_length(self, step: int, max_steps: int) -> int:
    """Steps of the call that starts after `step`: up to the next multiple of steps_per_call, never
    past max_steps. So a run resumed between multiples realigns with one shorter call, and a max_steps
    that is not a multiple ends with one (each length compiles once)."""
    return min(self.steps_per_call - step % self.steps_per_call, max_steps - step)

  def inputs(self, step: int, k: int) -> Any:
    """The data argument of the call of k steps after `step`: a tuple of the k steps' batches (token
    shards), else the source's one argument."""
    if k == 1 or not self.per_step_inputs:
      return self.source.train_inputs(step)
    return tuple(self.source.train_inputs(step + i) for i in range(k))

  def call(self, k: int, layer_stats: bool = False) -> StepFn:
    """The jitted call of k steps: (state, inputs(step, k)) -> (state after k steps, metrics)."""
    if (k, layer_stats) in self.pending:
      self.pending.pop((k, layer_stats))()
    if (k, layer_stats) not in self.calls:
      step_fn = functools.partial(self.step_fn, layer_stats=True) if layer_stats else self.step_fn
      state_sh, metrics_sh = self.shardings
      in_sh = self.source.input_shardings(self.mesh)
      if k > 1:
        step_fn = functools.partial(scan_steps, step_fn, k, self.per_step_inputs, state_sh)
        in_sh = (in_sh,) * k if self.per_step_inputs else in_sh
      self.calls[k, layer_stats] = jax.jit(step_fn, in_shardings=(state_sh, in_sh),
                                           out_shardings=(state_sh, metrics_sh), donate_argnums=0)
    return self.calls[k, layer_stats]

  def compile(self, state: Any, k: int, layer_stats: bool = False) -> None:
    """Compiles the call of k steps from `state` now, so that its first use is not slowed by it."""
    compiled = self.call(k, layer_stats).lower(state, self.inputs(int(state.step), k)).compile()
    self.calls[k, layer_stats] = compiled

  def __call__(self, state: Any, step: int, k: int, layer_stats: bool = False) -> tuple[Any, dict]:
    """Runs the k steps after `step` (the state's step) from `state`: (new state, metrics)."""
    return self.call(k, layer_stats)(state, self.inputs(step, k))
