"""Departures from GPT-2's optimizer, each off by default: Muon, the warmup-stable-decay schedule and
a moving average of the weights. gpt_jax/optim.py (GPT-2's AdamW) reaches each in one line.

  'muon' (train.optimizer)  `muon`: `optax.contrib.muon` (momentum, then Newton-Schulz
      orthogonalisation) for the four matrices of every block, optim.py's AdamW for everything else;
      `stacked_by_shape` batches its Newton-Schulz over the matrices of one shape (train.muon_batched).
  'wsd' (train.lr_schedule)  `wsd_schedule`: warmup, a constant learning rate, then a short cooldown.
  train.ema_decay > 0        `with_ema` appends `ema_weights`: an exponential moving average of the
      weights, kept in the optimizer state so that checkpoints carry it and a resumed run continues
      it exactly; evals and the kept checkpoint use it (`eval_params`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from gpt_jax import optim  # optim.py imports this module too: each reads the other only at call time.
from gpt_jax.errors import UserError

# The block matrices Muon updates, as (module, Linear) under each h_i; their kernels only.
MUON_MATRICES = (('attn', 'c_attn'), ('attn', 'c_proj'), ('mlp', 'c_fc'), ('mlp', 'c_proj'))


# --- Muon -----------------------------------------------------------------------------------------


def muon_labels(params: Any) -> Any:
  """'muon' for the kernels of every block's attn.c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj,
  'adamw' for everything else (wte, wpe, LayerNorm and QK-norm scales, biases).

  By name, not by shape: the embedding tables are 2-D too, but Muon's orthogonalised update suits
  only matrices that act on the residual stream as linear maps (Jordan et al.); a lookup table's rows
  are updated independently and stay with AdamW, as in modded-nanogpt.
  """
  def label(path: tuple, _: Any) -> str:
    keys = tuple(getattr(k, 'key', k) for k in path)
    block = len(keys) == 4 and str(keys[0]).startswith('h_') and keys[3] == 'kernel'
    return 'muon' if block and keys[1:3] in MUON_MATRICES else 'adamw'
  return jax.tree_util.tree_map_with_path(label, params)


def muon(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip) -> Muon on the block matrices (`muon_labels`), AdamW elsewhere.

  Muon is `optax.contrib.muon` (Nesterov momentum `muon_momentum`, `muon_ns_steps` Newton-Schulz
  steps with Keller Jordan's quintic coefficients, the update scaled by sqrt(max(1, fan_out / fan_in))),
  at `muon_learning_rate` times the shape of the configured schedule. It sees only the block matrices,
  so its own AdamW side (for non-2-D leaves) is left with nothing to do. The rest gets exactly the
  'adamw' chain's AdamW (its schedule, betas, weight decay on >= 2-D tensors, bias correction).

  Weight decay on the Muon matrices is its own field, `muon_weight_decay` (decoupled, multiplied by
  Muon's learning rate as in optax), 0 in the presets as in modded-nanogpt's speedrun records of
  that scale: reusing `weight_decay` would apply it at Muon's learning rate, some 20x AdamW's with
  the presets' values, a much stronger regulariser than the same number means for AdamW.
  """
  kwargs = dict(
      learning_rate=optim.lr_schedule(train_cfg, train_cfg.muon_learning_rate / train_cfg.learning_rate),
      beta=train_cfg.muon_momentum,
      ns_steps=train_cfg.muon_ns_steps,
      weight_decay=train_cfg.muon_weight_decay,
  )
  if train_cfg.muon_batched:
    # Each stacked (L, fan_in, fan_out) leaf is L matrices: axis 0 is a batch axis, which optax's
    # Newton-Schulz vmaps over and its width scale ignores.
    dims = optax.contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=2)
    matrices = stacked_by_shape(optax.contrib.muon(
        **kwargs, muon_weight_dimension_numbers=lambda tree: jax.tree_util.tree_map(lambda _: dims, tree)))
  else:
    matrices = optax.contrib.muon(**kwargs)
  parts = []
  if train_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
  # The labels are keys of the optimizer state, so of every checkpoint: they stay 'muon' and 'adamw'.
  parts.append(optax.partition({'muon': matrices, 'adamw': optim.adamw(train_cfg, clip=False)}, muon_labels))
  return optax.chain(*parts)


class StackedState(NamedTuple):
  """The state of a transformation run by `stacked_by_shape`: shaped like its stacked leaves."""
  inner: Any


class _Stacked(NamedTuple):
  """A tree's leaves stacked by shape (`stacked_by_shape`), with what it takes to unstack them."""
  leaves: list[jax.Array]         # The tree's leaves, in flattening order.
  treedef: Any                    # Its structure.
  groups: dict[str, list[int]]    # Shape key ('256x768') -> indices of the leaves of that shape.
  arrays: dict[str, jax.Array]    # Shape key -> those leaves stacked, (L, 256, 768).


def stacked_by_shape(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Runs `inner` on the leaves stacked by shape, {'256x768': (L, 256, 768) array, ...}, and gives
  its updates back in the tree's own structure.

  For Muon (`train.muon_batched`): its Newton-Schulz orthogonalisation is a chain of 3 x ns_steps
  small dependent matmuls per matrix; the n_layer matrices of one shape then go through one chain
  of batched matmuls instead of n_layer chains, which keeps a CPU's cores busier
  (docs/speedrun.md has the step cost). Every stacked matrix is still orthogonalised on its own, so
  the update is the same maths; its float32 rounding differs. The state is the stacked tree's, so a
  checkpoint of one setting does not resume with the other.
  """
  def stack(tree: Any) -> _Stacked:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    groups: dict[str, list[int]] = {}
    for i, x in enumerate(leaves):
      groups.setdefault('x'.join(map(str, x.shape)), []).append(i)
    arrays = {k: jnp.stack([leaves[i] for i in idx]) for k, idx in groups.items()}
    return _Stacked(leaves, treedef, groups, arrays)

  def init(params: Any) -> StackedState:
    return StackedState(inner.init(stack(params).arrays))

  def update(updates: Any, state: StackedState, params: Any = None) -> tuple[Any, StackedState]:
    u = stack(updates)
    stacked_params = None if params is None else stack(params).arrays  # Same structure, same groups.
    out, inner_state = inner.update(u.arrays, state.inner, stacked_params)
    leaves = list(u.leaves)
    for k, idx in u.groups.items():
      for j, i in enumerate(idx):
        leaves[i] = out[k][j]
    return jax.tree_util.tree_unflatten(u.treedef, leaves), StackedState(inner_state)

  return optax.GradientTransformation(init, update)


# --- the warmup-stable-decay schedule ------------------------------------------------------------


def wsd_boundaries(train_cfg: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(end of warmup, start of cooldown, end of cooldown) of the 'wsd' schedule, in steps.

  The cooldown is the last `cooldown_fraction` of the `lr_decay_steps` the schedule spans (rounded,
  at least one step), so it ends where the cosine would; UserError if it would overlap the warmup.
  """
  total, warmup, fraction = int(train_cfg.lr_decay_steps), int(train_cfg.warmup_steps), \
      float(train_cfg.cooldown_fraction)
  if not 0.0 < fraction <= 1.0:
    raise UserError(f'train.cooldown_fraction must be in (0, 1] (got {fraction})')
  start = total - max(1, round(fraction * total))
  if start < warmup:
    raise UserError(f'train.lr_schedule=wsd: the cooldown (the last {fraction:g} of lr_decay_steps='
                    f'{total}, from step {start}) would start inside the warmup ({warmup} steps); '
                    'lower train.cooldown_fraction or train.warmup_steps, or raise lr_decay_steps.')
  return warmup, start, total


def wsd_schedule(train_cfg: ml_collections.ConfigDict, scale: float = 1.0) -> optax.Schedule:
  """Warmup-stable-decay: linear warmup 0 -> learning_rate (as the cosine's), constant, then a
  cooldown to `min_learning_rate` over the last `cooldown_fraction` of `lr_decay_steps`; flat after.

  The cooldown is 1 - sqrt: lr = min + (peak - min) (1 - sqrt(s / n)) at step s of n. Hagele et al.
  (2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations") found it
  matches or beats cosine, where a linear cooldown falls slightly short: it leaves the stable phase
  more steeply and spends more of the cooldown at low learning rates. The stable phase at the peak
  makes the schedule not depend on the run length until the cooldown starts.
  """
  peak, end = train_cfg.learning_rate * scale, train_cfg.min_learning_rate * scale
  warmup, start, total = wsd_boundaries(train_cfg)
  n = total - start

  def cooldown(s: Any) -> jax.Array:
    frac = jnp.clip(jnp.asarray(s, jnp.float32) / n, 0.0, 1.0)
    return end + (peak - end) * (1.0 - jnp.sqrt(frac))

  schedules, boundaries = [optax.constant_schedule(peak), cooldown], [start]
  if warmup > 0:
    schedules, boundaries = [optax.linear_schedule(0.0, peak, warmup)] + schedules, [warmup, start]
  return optax.join_schedules(schedules, boundaries)


# --- the moving average of the weights ----------------------------------------------------------


def with_ema(tx: optax.GradientTransformation, decay: float) -> optax.GradientTransformation:
  """`tx` followed by `ema_weights(decay)` if decay > 0; else `tx` itself, so that with the average
  off the optimizer state (and every bit of the run) is exactly as without this option."""
  decay = float(decay)
  return optax.chain(tx, ema_weights(decay)) if decay > 0 else tx


class EmaState(NamedTuple):
  """The weights' moving average, in the optimizer state (so Orbax saves and restores it)."""
  count: jax.Array  # () int32: updates averaged so far.
  ema: Any          # The debiased average of the weights after each update, shaped like the params.


def ema_weights(decay: float) -> optax.GradientTransformation:
  """An exponential moving average of the weights; the updates pass through unchanged.

  It must come last in the chain, where `updates` are what `TrainState.apply_gradients` adds to the
  params, so that p_t = params + updates is the weight after update t. It keeps the debiased average

      ema_t = sum_i decay^(t-i) (1 - decay) p_i / (1 - decay^t)        (i = 1 .. t)

  (Adam's bias correction applied to a zero-initialised EMA), updated as
  ema_t = ema_{t-1} + a_t (p_t - ema_{t-1}) with a_t = (1 - decay) / (1 - decay^t). So the initial
  random weights never enter it (a_1 = 1), and no decay warmup is needed; before the first update it
  holds the initial weights, so an eval at step 0 sees what training starts from.
  """
  if not 0.0 < decay < 1.0:
    raise UserError(f'train.ema_decay must be in (0, 1), 0 = off (got {decay})')

  def init(params: Any) -> EmaState:
    return EmaState(count=jnp.zeros((), jnp.int32), ema=jax.tree_util.tree_map(jnp.copy, params))

  def update(updates: Any, state: EmaState, params: Any = None) -> tuple[Any, EmaState]:
    if params is None:
      raise ValueError('ema_weights needs the params: call update(updates, state, params)')
    t = state.count + 1
    a = jnp.float32(1.0 - decay) / optim.bias_correction(decay, t)
    ema = jax.tree_util.tree_map(
        lambda e, p, u: e + (a * ((p + u) - e)).astype(e.dtype), state.ema, params, updates)
    return updates, EmaState(count=t, ema=ema)

  return optax.GradientTransformation(init, update)


def ema_state(opt_state: Any) -> EmaState | None:
  """The `EmaState` inside an optimizer state, or None when the run keeps no average."""
  found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, EmaState))
           if isinstance(s, EmaState)]
  return found[0] if found else None


def eval_params(state: Any) -> Any:
  """The weights evals and the kept checkpoint use: the EMA if the optimizer keeps one, else params."""
  ema = ema_state(state.opt_state)
  return state.params if ema is None else ema.ema
