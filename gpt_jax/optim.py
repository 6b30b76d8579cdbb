"""The optimizer: global-norm clipping -> AdamW with a warmup + cosine learning-rate schedule.

Built from optax pieces. Weight decay applies only to >= 2-D tensors (matmul weights and the
embedding tables), never to biases or LayerNorm scales, as in GPT-2 / nanoGPT.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def lr_schedule(train_cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup 0 -> learning_rate over `warmup_steps`, cosine down to `min_learning_rate` at
  step `lr_decay_steps`, then flat.

  optax's `decay_steps` counts *from step 0*, warmup included, which is exactly nanoGPT's
  `lr_decay_iters` meaning, so it is passed through unchanged (not `lr_decay_steps - warmup_steps`).
  """
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=train_cfg.learning_rate,
      warmup_steps=train_cfg.warmup_steps,
      decay_steps=max(train_cfg.lr_decay_steps, train_cfg.warmup_steps + 1),
      end_value=train_cfg.min_learning_rate,
  )


def decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay: every tensor with ndim >= 2."""
  return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip) -> AdamW(schedule, beta1, beta2, weight_decay on the mask)."""
  parts = []
  if train_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
  parts.append(optax.adamw(
      learning_rate=lr_schedule(train_cfg),
      b1=train_cfg.beta1,
      b2=train_cfg.beta2,
      eps=1e-8,
      weight_decay=train_cfg.weight_decay,
      mask=decay_mask,
  ))
  return optax.chain(*parts)
