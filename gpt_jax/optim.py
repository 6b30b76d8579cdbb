"""The optimizer: global-norm clipping -> AdamW with a warmup + cosine learning-rate schedule.

Two implementations of the same maths, chosen by `train.optimizer`:
  'optax'    the production chain, built from optax pieces (the default);
  'scratch'  a hand-written AdamW: pure functions over pytrees, with the update written out below.
Both decay only >= 2-D tensors (matmul weights and the embedding tables), never biases or
LayerNorm scales, as in GPT-2 / nanoGPT. Both compute Adam's bias correction 1 - b^t accurately
(`bias_correction`); that is the one piece the optax chain does not take from `optax.adamw`.
tests/test_optim.py checks that 200 training steps with either give the same parameters (bit for
bit, in practice), and both against stock `optax.adamw`.

A third choice, 'muon', is a speedrun option (issue 14): `optax.contrib.muon` (momentum, then
Newton-Schulz orthogonalisation) for the four matrices of every block, and the 'optax' AdamW above
for everything else (`make_muon_optimizer`). `train.lr_schedule` picks the schedule: nanoGPT's
warmup + cosine ('cosine', the default) or warmup-stable-decay ('wsd').

The scratch optimizer is exposed as an `optax.GradientTransformation(init, update)` so Flax's
`TrainState.apply_gradients` uses it unchanged; its state is a `ScratchAdamWState` NamedTuple of
arrays, which Orbax checkpoints like any other pytree.

`train.ema_decay > 0` (a speedrun option, off by default) appends `ema_weights` to any of the three: an
exponential moving average of the weights, kept in the optimizer state so that checkpoints carry it
and a resumed run continues it exactly; evals and the kept checkpoint use it (`eval_params`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from gpt_jax.errors import UserError

OPTIMIZERS = ('optax', 'scratch', 'muon')
LR_SCHEDULES = ('cosine', 'wsd')
ADAM_EPS = 1e-8  # nanoGPT / PyTorch's AdamW default; not a config field.
# The block matrices Muon updates, as (module, Linear) under each h_i; their kernels only.
MUON_MATRICES = (('attn', 'c_attn'), ('attn', 'c_proj'), ('mlp', 'c_fc'), ('mlp', 'c_proj'))


def lr_schedule(train_cfg: ml_collections.ConfigDict, scale: float = 1.0) -> optax.Schedule:
  """The learning rate of every step, by `train.lr_schedule`; `scale` multiplies all of it.

  'cosine' (`cosine_schedule`) is nanoGPT's; 'wsd' (`wsd_schedule`) is warmup-stable-decay. Muon's
  learning rate is the same schedule scaled by muon_learning_rate / learning_rate.
  """
  kind = train_cfg.lr_schedule
  if kind == 'cosine':
    return cosine_schedule(train_cfg, scale)
  if kind == 'wsd':
    return wsd_schedule(train_cfg, scale)
  raise UserError(f'train.lr_schedule must be one of {LR_SCHEDULES} (got {kind!r})')


def cosine_schedule(train_cfg: ml_collections.ConfigDict, scale: float = 1.0) -> optax.Schedule:
  """Linear warmup 0 -> learning_rate over `warmup_steps`, cosine down to `min_learning_rate` at
  step `lr_decay_steps`, then flat.

  optax's `decay_steps` counts *from step 0*, warmup included, which is exactly nanoGPT's
  `lr_decay_iters` meaning, so it is passed through unchanged (not `lr_decay_steps - warmup_steps`).
  The warmup starts at 0 (`init_value=0`): step s < warmup gets learning_rate * s / warmup_steps, so
  the very first update has learning rate 0 (it only fills the Adam moments). That is nanoGPT's
  original get_lr; today's nanoGPT uses (s + 1) / (warmup_steps + 1) instead, one step ahead.
  A constant learning rate: warmup_steps = 0 and min_learning_rate = learning_rate.
  """
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=train_cfg.learning_rate * scale,
      warmup_steps=train_cfg.warmup_steps,
      decay_steps=max(train_cfg.lr_decay_steps, train_cfg.warmup_steps + 1),
      end_value=train_cfg.min_learning_rate * scale,
  )


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


def decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay: every tensor with ndim >= 2."""
  return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer named by `train_cfg.optimizer`, followed by `ema_weights` if train.ema_decay > 0."""
  tx = _base_optimizer(train_cfg)
  decay = float(train_cfg.ema_decay)
  # Off: the chain (and so the state's structure and every bit of the run) is exactly as without EMA.
  return optax.chain(tx, ema_weights(decay)) if decay > 0 else tx


def _base_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  kind = {'adamw': 'optax', 'adamw_by_hand': 'scratch'}.get(train_cfg.optimizer, train_cfg.optimizer)
  if kind == 'optax':
    return make_optax_optimizer(train_cfg)
  if kind == 'scratch':
    return scratch_adamw(train_cfg)
  if kind == 'muon':
    return make_muon_optimizer(train_cfg)
  raise UserError(f'train.optimizer must be one of {OPTIMIZERS} (got {kind!r}): \'optax\' is the '
                  "optax chain, 'scratch' the hand-written AdamW, 'muon' Muon for the block "
                  'matrices with that AdamW for the rest.')


def make_optax_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip) -> AdamW(schedule, beta1, beta2, weight_decay on the mask).

  The AdamW part is `optax.adamw`'s own chain (scale_by_adam -> add_decayed_weights ->
  scale_by_learning_rate) with `scale_by_adam` below in place of optax's, so the optimizer state
  has exactly optax.adamw's structure.
  """
  parts = []
  if train_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
  parts.append(_adamw(train_cfg))
  return optax.chain(*parts)


def _adamw(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """optax.adamw's chain with the accurate bias correction (no clipping)."""
  return optax.chain(
      scale_by_adam(train_cfg.beta1, train_cfg.beta2, ADAM_EPS),
      optax.add_decayed_weights(train_cfg.weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(lr_schedule(train_cfg)),
  )


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


def make_muon_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip) -> Muon on the block matrices (`muon_labels`), AdamW elsewhere.

  Muon is `optax.contrib.muon` (Nesterov momentum `muon_momentum`, `muon_ns_steps` Newton-Schulz
  steps with Keller Jordan's quintic coefficients, the update scaled by sqrt(max(1, fan_out / fan_in))),
  at `muon_learning_rate` times the shape of the configured schedule. It sees only the block matrices,
  so its own AdamW side (for non-2-D leaves) is left with nothing to do. The rest gets exactly the
  'optax' chain's AdamW (its schedule, betas, weight decay on >= 2-D tensors, bias correction).

  Weight decay on the Muon matrices is its own field, `muon_weight_decay` (decoupled, multiplied by
  Muon's learning rate as in optax), 0 in the presets as in modded-nanogpt's speedrun records of
  that scale: reusing `weight_decay` would apply it at Muon's learning rate, some 20x AdamW's with
  the presets' values, a much stronger regulariser than the same number means for AdamW.
  """
  kwargs = dict(
      learning_rate=lr_schedule(train_cfg, train_cfg.muon_learning_rate / train_cfg.learning_rate),
      beta=train_cfg.muon_momentum,
      ns_steps=train_cfg.muon_ns_steps,
      weight_decay=train_cfg.muon_weight_decay,
  )
  if train_cfg.muon_batched:
    # Each stacked (L, fan_in, fan_out) leaf is L matrices: axis 0 is a batch axis, which optax's
    # Newton-Schulz vmaps over and its width scale ignores.
    dims = optax.contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=2)
    muon = stacked_by_shape(optax.contrib.muon(
        **kwargs, muon_weight_dimension_numbers=lambda tree: jax.tree_util.tree_map(lambda _: dims, tree)))
  else:
    muon = optax.contrib.muon(**kwargs)
  parts = []
  if train_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
  parts.append(optax.partition({'muon': muon, 'adamw': _adamw(train_cfg)}, muon_labels))
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
    a = jnp.float32(1.0 - decay) / bias_correction(decay, t)
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


def bias_correction(decay: float, count: jax.Array) -> jax.Array:
  """1 - decay**count in float32, accurate to a couple of float32 roundings.

  The textbook form `1 - decay**count` (optax's) cancels catastrophically in float32: 0.99 is stored
  as 0.99000001 and the power is rounded again, so for beta2 = 0.99 the correction is off by up to
  1.8e-6 relative in the first 100 steps (2e-5 for 0.999), and nearly always in the same direction.
  Every parameter's early steps then come out slightly too short, a bias PyTorch's AdamW does not
  have (it computes this scalar in double precision): on the `tiny` preset it put the JAX run 9.3e-5
  in loss from a float64 run by step 89, against 1.1e-5 with this form
  (docs/faithfulness.md, "JAX vs PyTorch").
  Written as -expm1(count * log1p(-(1 - decay))), with 1 - decay formed in double precision before
  the cast, it is within 3e-7 of exact.
  """
  one_minus = jnp.float32(1.0 - decay)  # 0.01, not 1 - float32(0.99)
  return -jnp.expm1(count.astype(jnp.float32) * jnp.log1p(-one_minus))


def scale_by_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """`optax.scale_by_adam` with an accurate bias correction (see `bias_correction`).

  optax's own transformation keeps the state (count and both moments, `optax.ScaleByAdamState`, so
  checkpoints are interchangeable with `optax.adamw`'s); only m_hat / (sqrt(v_hat) + eps) is formed
  here, from its updated moments. Under jit, optax's discarded update costs nothing.
  """
  inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

  def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
    _, state = inner.update(updates, state, params)
    c1, c2 = bias_correction(b1, state.count), bias_correction(b2, state.count)
    return jax.tree_util.tree_map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps),
                                  state.mu, state.nu), state

  return optax.GradientTransformation(inner.init, update)


# --- AdamW from first principles ----------------------------------------------------------------


class ScratchAdamWState(NamedTuple):
  """Everything AdamW remembers between steps (a pytree of arrays, so Orbax can save it)."""
  count: jax.Array  # () int32: updates applied so far. Drives both bias correction and the schedule.
  mu: Any           # First moment (EMA of gradients), shaped like the params.
  nu: Any           # Second moment (EMA of squared gradients), shaped like the params.


def global_norm(tree: Any) -> jax.Array:
  """sqrt of the sum of squares of every element of every leaf: the norm of the flattened tree."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


def clip_by_global_norm(grads: Any, max_norm: float) -> Any:
  """Scales all gradients by max_norm / norm when their global norm exceeds max_norm.

  One factor for the whole tree keeps the update's direction; only its length is capped.
  """
  norm = global_norm(grads)
  clip = norm >= max_norm  # where() discards g / norm when not clipping, so a zero norm is harmless.
  return jax.tree_util.tree_map(lambda g: jnp.where(clip, g / norm * max_norm, g), grads)


def adamw_init(params: Any) -> ScratchAdamWState:
  """Zero moments shaped like the params, count 0."""
  return ScratchAdamWState(count=jnp.zeros((), jnp.int32),
                           mu=jax.tree_util.tree_map(jnp.zeros_like, params),
                           nu=jax.tree_util.tree_map(jnp.zeros_like, params))


def adamw_update(grads: Any, state: ScratchAdamWState, params: Any, *, lr: jax.Array, b1: float,
                 b2: float, eps: float, weight_decay: float,
                 ) -> tuple[Any, ScratchAdamWState]:
  """One AdamW step (Loshchilov & Hutter): returns the updates to *add* to params, and the state.

    m <- b1 m + (1 - b1) g                  v <- b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^t)                  v_hat = v / (1 - b2^t)       (t = count + 1)
    update = -lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p)    (decay on >= 2-D p only)

  The decay is *decoupled*: it is added after the Adam normalisation, so it shrinks weights at
  rate lr * weight_decay whatever their gradient scale (L2 in the loss would be divided by
  sqrt(v_hat) too).
  """
  t = state.count + 1
  # The moments start at 0, so early EMAs are biased towards 0 by a factor (1 - b^t); divide it out.
  c1, c2 = bias_correction(b1, t), bias_correction(b2, t)
  mu = jax.tree_util.tree_map(lambda g, m: (1.0 - b1) * g + b1 * m, grads, state.mu)
  nu = jax.tree_util.tree_map(lambda g, v: (1.0 - b2) * (g * g) + b2 * v, grads, state.nu)

  def leaf_update(m, v, p):
    u = (m / c1) / (jnp.sqrt(v / c2) + eps)
    if p.ndim >= 2:  # The decay mask (see `decay_mask`), decided statically from the shape.
      u = u + weight_decay * p
    return -lr * u

  updates = jax.tree_util.tree_map(leaf_update, mu, nu, params)
  return updates, ScratchAdamWState(count=t, mu=mu, nu=nu)


def scratch_adamw(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW with the warmup-cosine schedule, as an optax GradientTransformation.

  Clipping and the update are the functions above; from optax come only the container type and the
  schedule function (`lr_schedule`, shared with the optax chain).
  """
  grad_clip = float(train_cfg.grad_clip)
  hyper = dict(b1=float(train_cfg.beta1), b2=float(train_cfg.beta2), eps=ADAM_EPS,
               weight_decay=float(train_cfg.weight_decay))
  # The learning rate comes from the same `lr_schedule` as the optax chain, so both optimizers see
  # bit-identical learning rates. (A re-derived formula, lr * s / warmup, differs from optax's
  # algebra by an ulp at some steps; 200 training steps amplify that to ~1e-6 relative in the params,
  # which would hide a real bug in the update behind noise.)
  schedule = lr_schedule(train_cfg)

  def init(params: Any) -> ScratchAdamWState:
    return adamw_init(params)

  def update(grads: Any, state: ScratchAdamWState, params: Any = None
             ) -> tuple[Any, ScratchAdamWState]:
    if params is None:
      raise ValueError('the scratch AdamW needs params for weight decay: call update(g, s, params)')
    if grad_clip > 0:
      grads = clip_by_global_norm(grads, grad_clip)
    lr = schedule(state.count)  # This update's learning rate: step `count` (0 for the first).
    return adamw_update(grads, state, params, lr=lr, **hyper)

  return optax.GradientTransformation(init, update)
