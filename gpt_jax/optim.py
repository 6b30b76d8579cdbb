"""GPT-2's optimizer: global-norm gradient clipping -> AdamW, with a warmup + cosine learning rate.

Two implementations of the same maths, chosen by `train.optimizer`: 'adamw' (`adamw`, a chain of optax
pieces; the default) and 'adamw_by_hand' (`adamw_by_hand`, the update written out over pytrees). Both
decay only >= 2-D tensors (matmul weights, embedding tables), never biases or LayerNorm scales, as
GPT-2 / nanoGPT, and both compute Adam's bias correction accurately (`bias_correction`).
tests/test_optim.py checks them against each other and against stock `optax.adamw`. The hand-written
one is an `optax.GradientTransformation`, so Flax's `TrainState.apply_gradients` uses it unchanged; its
state is a NamedTuple of arrays, which Orbax saves like any pytree (by field names, not class name).
The departures (the 'muon' optimizer, the 'wsd' schedule, the weights' moving average) live in
gpt_jax/optim_variants.py, reached from here in one line each; a first reading can skip that file.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from gpt_jax import optim_variants
from gpt_jax.errors import UserError

OPTIMIZERS = ('adamw', 'adamw_by_hand', 'muon')
# Older runs stored these names (config.json, checkpoint metadata, command lines): 'optax' named the
# library, 'scratch' the hand-written AdamW. Read through `optimizer_name`, old runs still resume.
OPTIMIZER_ALIASES = {'optax': 'adamw', 'scratch': 'adamw_by_hand'}
LR_SCHEDULES = ('cosine', 'wsd')
ADAM_EPS = 1e-8  # nanoGPT / PyTorch's AdamW default; not a config field.


def optimizer_name(name: str) -> str:
  """The name in OPTIMIZERS that train.optimizer `name` means (an old alias gives its new name)."""
  name = OPTIMIZER_ALIASES.get(name, name)
  if name not in OPTIMIZERS:
    raise UserError(f'train.optimizer must be one of {OPTIMIZERS} (got {name!r})')
  return name


def make_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer named by `train_cfg.optimizer`, then the weights' average if train.ema_decay > 0."""
  build = {'adamw': adamw, 'adamw_by_hand': adamw_by_hand, 'muon': optim_variants.muon}
  tx = build[optimizer_name(train_cfg.optimizer)](train_cfg)
  return optim_variants.with_ema(tx, train_cfg.ema_decay)  # `tx` itself when ema_decay = 0.


def lr_schedule(train_cfg: ml_collections.ConfigDict, scale: float = 1.0) -> optax.Schedule:
  """The learning rate of every step by `train.lr_schedule` ('cosine': nanoGPT's; 'wsd': optim_variants),
  times `scale` (Muon's: muon_learning_rate / learning_rate)."""
  kind = train_cfg.lr_schedule
  if kind == 'cosine':
    return cosine_schedule(train_cfg, scale)
  if kind == 'wsd':
    return optim_variants.wsd_schedule(train_cfg, scale)
  raise UserError(f'train.lr_schedule must be one of {LR_SCHEDULES} (got {kind!r})')


def cosine_schedule(train_cfg: ml_collections.ConfigDict, scale: float = 1.0) -> optax.Schedule:
  """Linear warmup 0 -> learning_rate over `warmup_steps`, cosine down to `min_learning_rate` at step
  `lr_decay_steps`, then flat. optax's `decay_steps` counts from step 0, warmup included: exactly
  nanoGPT's `lr_decay_iters`, so it passes through unchanged. Step s < warmup gets learning_rate * s /
  warmup_steps, so the first update's is 0 (it only fills the Adam moments): nanoGPT's original get_lr
  (today's uses (s + 1) / (warmup_steps + 1), one step ahead). A constant learning rate:
  warmup_steps = 0 and min_learning_rate = learning_rate.
  """
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_cfg.learning_rate * scale, warmup_steps=train_cfg.warmup_steps,
      decay_steps=max(train_cfg.lr_decay_steps, train_cfg.warmup_steps + 1),
      end_value=train_cfg.min_learning_rate * scale)


def decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay: every tensor with ndim >= 2."""
  return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def adamw(train_cfg: ml_collections.ConfigDict, clip: bool = True) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip) -> AdamW(schedule, beta1, beta2, weight_decay on the mask).

  The AdamW is `optax.adamw`'s own chain with `scale_by_adam` below in place of optax's, so the state
  has exactly optax.adamw's structure. `clip=False`: no clipping (Muon's chain clips before it splits).
  """
  tx = optax.chain(
      scale_by_adam(train_cfg.beta1, train_cfg.beta2, ADAM_EPS),
      optax.add_decayed_weights(train_cfg.weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(lr_schedule(train_cfg)),
  )
  if not clip:
    return tx
  # The state's tree is (clip's, AdamW's), or (AdamW's,) with grad_clip = 0: checkpoints depend on it.
  clipping = [optax.clip_by_global_norm(train_cfg.grad_clip)] if train_cfg.grad_clip > 0 else []
  return optax.chain(*clipping, tx)


def bias_correction(decay: float, count: jax.Array) -> jax.Array:
  """1 - decay**count in float32, accurate to a couple of float32 roundings.

  The textbook `1 - decay**count` (optax's) cancels in float32 (0.99 is stored as 0.99000001 and the
  power is rounded again), nearly always in the same direction, so every early step came out slightly
  too short: a bias PyTorch's AdamW, which computes this scalar in double precision, does not have
  (docs/faithfulness.md, "JAX vs PyTorch"). -expm1(count * log1p(-(1 - decay))), with 1 - decay
  formed in double precision before the cast, is accurate.
  """
  one_minus = jnp.float32(1.0 - decay)  # 0.01, not 1 - float32(0.99)
  return -jnp.expm1(count.astype(jnp.float32) * jnp.log1p(-one_minus))


def scale_by_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """`optax.scale_by_adam` with an accurate bias correction (see `bias_correction`). optax's keeps the
  state (`ScaleByAdamState`: checkpoints as `optax.adamw`'s); only m_hat / (sqrt(v_hat) + eps) is formed
  here, from its updated moments. Under jit, optax's discarded update costs nothing."""
  inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

  def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
    _, state = inner.update(updates, state, params)
    c1, c2 = bias_correction(b1, state.count), bias_correction(b2, state.count)
    return jax.tree_util.tree_map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps),
                                  state.mu, state.nu), state

  return optax.GradientTransformation(inner.init, update)


# --- AdamW from first principles ----------------------------------------------------------------


class AdamWByHandState(NamedTuple):
  """Everything AdamW remembers between steps (a pytree of arrays, so Orbax can save it)."""
  count: jax.Array  # () int32: updates applied so far. Drives both bias correction and the schedule.
  mu: Any           # First moment (EMA of gradients), shaped like the params.
  nu: Any           # Second moment (EMA of squared gradients), shaped like the params.


def global_norm(tree: Any) -> jax.Array:
  """sqrt of the sum of squares of every element of every leaf: the norm of the flattened tree."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


def clip_by_global_norm(grads: Any, max_norm: float) -> Any:
  """Scales all gradients by max_norm / norm when their global norm exceeds max_norm: one factor for
  the whole tree keeps the update's direction; only its length is capped."""
  norm = global_norm(grads)
  clip = norm >= max_norm  # where() discards g / norm when not clipping, so a zero norm is harmless.
  return jax.tree_util.tree_map(lambda g: jnp.where(clip, g / norm * max_norm, g), grads)


def adamw_init(params: Any) -> AdamWByHandState:
  """Zero moments shaped like the params, count 0."""
  return AdamWByHandState(count=jnp.zeros((), jnp.int32),
                           mu=jax.tree_util.tree_map(jnp.zeros_like, params),
                           nu=jax.tree_util.tree_map(jnp.zeros_like, params))


def adamw_update(grads: Any, state: AdamWByHandState, params: Any, *, lr: jax.Array, b1: float,
                 b2: float, eps: float, weight_decay: float,
                 ) -> tuple[Any, AdamWByHandState]:
  """One AdamW step (Loshchilov & Hutter): returns the updates to *add* to params, and the state.

    m <- b1 m + (1 - b1) g                  v <- b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^t)                  v_hat = v / (1 - b2^t)       (t = count + 1)
    update = -lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p)    (decay on >= 2-D p only)

  The decay is *decoupled*: added after the Adam normalisation, it shrinks weights at rate
  lr * weight_decay whatever their gradient scale (L2 in the loss would be divided by sqrt(v_hat) too).
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
  return updates, AdamWByHandState(count=t, mu=mu, nu=nu)


def adamw_by_hand(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW with the warmup-cosine schedule, as an optax GradientTransformation:
  the functions above, with only the container type and `lr_schedule` (shared with `adamw`) from optax."""
  grad_clip = float(train_cfg.grad_clip)
  hyper = dict(b1=float(train_cfg.beta1), b2=float(train_cfg.beta2), eps=ADAM_EPS,
               weight_decay=float(train_cfg.weight_decay))
  # The same `lr_schedule` as the optax chain, so both see bit-identical learning rates: a re-derived
  # formula (lr * s / warmup) differs from optax's algebra by an ulp at some steps, which training
  # amplifies into a difference in the params that would hide a real bug in the update behind noise.
  schedule = lr_schedule(train_cfg)

  def update(grads: Any, state: AdamWByHandState, params: Any = None) -> tuple[Any, AdamWByHandState]:
    if params is None:
      raise ValueError('the hand-written AdamW needs params for weight decay: call update(g, s, params)')
    if grad_clip > 0:
      grads = clip_by_global_norm(grads, grad_clip)
    lr = schedule(state.count)  # This update's learning rate: step `count` (0 for the first).
    return adamw_update(grads, state, params, lr=lr, **hyper)

  return optax.GradientTransformation(adamw_init, update)
