"""Per-layer statistics of a training step: gradient, parameter and update norms, activations, attention.

`layer_stats` is called inside the jitted train step every `train.layer_stats_interval` steps. One
metrics.jsonl record per such step, a normal train record plus a nested 'layer_stats' dict:

  {"step": 50, "train_loss": 2.31, "lr": 0.001, "grad_norm": 0.84, "time": 12.3,
   "layer_stats": {
     "grad_norm":    {"wte": .., "wpe": .., "h_0": .., ..., "ln_f": ..},  ||g|| per layer, before clipping
     "param_norm":   {same keys},  ||theta|| of the parameters the gradient was taken at
     "update_ratio": {same keys},  ||delta theta|| / ||theta|| of the update the optimizer applied
     "act_rms":      {"embed": .., "h_0": .., ...},  RMS of the residual stream after each block
     "attn_entropy": {"h_0": [one value per head], ...},  nats, mean over batch rows and positions
     "attn_entropy_uniform": ..,  the same mean for uniform causal attention (the maximum possible)
     "logit_std":    ..}}  std of the final logits over the vocabulary, mean over positions

"Layer" means a top-level parameter group: the token table `wte` (also the tied output layer), the
position table `wpe`, each block `h_i`, and the final LayerNorm `ln_f`. Why these numbers:
  * grad_norm per layer shows where the signal goes (vanishing in early blocks? the LM head dominating?);
  * update_ratio is how far a step moves each layer relative to its size; ~1e-3 is the folklore
    healthy range for Adam, much larger means the lr is too high for that layer;
  * act_rms grows with depth in a pre-LN model (every block adds to the residual stream);
  * attention entropy falls as heads learn to focus (log(t+1) nats is uniform over the t+1 positions);
  * logit_std is the model's confidence scale: the softmax sharpens as it grows.

The activation / attention statistics come from a second, deterministic forward pass over the first
`ACT_ROWS` rows of the step's batch with the parameters the gradient was taken at (so with dropout > 0
they describe the model without dropout noise). That pass asks the model for its attention
probabilities (`GPT(..., record_probs=True)`), which only the written-out full (T, T) attention path
has; the other kernels compute the same function.

Cost: the loop compiles the step twice, plain and with statistics, and runs the second only on
interval steps, so every other step is the unchanged program (computing the statistics under
`lax.cond` in one step function would instead cost something on *every* step; docs/seeing-inside.md has the
measured figures).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gpt_jax.config import ModelConfig
from gpt_jax.model import GPT

ACT_ROWS = 8  # Batch rows of the statistics forward pass: 8 * block_size positions is plenty for means.


def layer_norms(tree: Any) -> dict[str, jax.Array]:
  """||.|| of each top-level group of a params-shaped tree: wte, wpe, h_0, ..., ln_f."""
  return {name: optax.tree.norm(sub) for name, sub in tree.items()}


def rms(x: jax.Array) -> jax.Array:
  """Root mean square over all elements, in float32."""
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def attention_entropy(probs: jax.Array) -> jax.Array:
  """Entropy (nats) of each attention row, averaged over batch and query positions.

  probs: (B, H, T, S) rows summing to 1, exactly 0 on masked positions. Returns (H,).
  """
  p = probs.astype(jnp.float32)
  plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)  # 0 log 0 = 0, no NaN grads.
  return -jnp.sum(plogp, axis=-1).mean(axis=(0, 2))


def uniform_entropy(T: int) -> float:
  """Mean entropy of uniform causal attention over T positions: mean_t log(t + 1)."""
  return float(np.mean(np.log(np.arange(1, T + 1))))


def forward_with_intermediates(params: Any, cfg: ModelConfig, idx: jax.Array,
                               ) -> tuple[jax.Array, dict[str, Any]]:
  """Deterministic forward that also returns what the model sows (manual attention path).

  Returns logits (B, T, V) and {'embed': (B, T, C), 'resid': [per block (B, T, C)],
  'attn_probs': [per block (B, H, T, T)]}.
  """
  model = GPT(dataclasses.replace(cfg, attention='manual', dropout=0.0), record_probs=True)
  logits, state = model.apply({'params': params}, idx, mutable=['intermediates'])
  inter = state['intermediates']
  blocks = [inter[f'h_{i}'] for i in range(cfg.n_layer)]
  return logits, {'embed': inter['embed'][0],
                  'resid': [b['resid'][0] for b in blocks],
                  'attn_probs': [b['attn']['attn_probs'][0] for b in blocks]}


def layer_stats(cfg: ModelConfig, params: Any, new_params: Any, grads: Any,
             x: jax.Array) -> dict[str, Any]:
  """The per-layer statistics of one optimizer step (see the module docstring); call inside jit.

  params: before the update; new_params: after it; grads: the (unclipped) gradients; x: (B, T) the
  step's input tokens, of which the first ACT_ROWS rows feed the statistics forward pass.
  """
  delta = jax.tree_util.tree_map(jnp.subtract, new_params, params)
  p_norm, g_norm, d_norm = layer_norms(params), layer_norms(grads), layer_norms(delta)
  logits, inter = forward_with_intermediates(params, cfg, x[:ACT_ROWS])
  names = [f'h_{i}' for i in range(cfg.n_layer)]
  return {
      'grad_norm': g_norm,
      'param_norm': p_norm,
      'update_ratio': {k: d_norm[k] / p_norm[k] for k in p_norm},
      'act_rms': {'embed': rms(inter['embed']), **{n: rms(r) for n, r in zip(names, inter['resid'])}},
      'attn_entropy': {n: attention_entropy(p) for n, p in zip(names, inter['attn_probs'])},
      'logit_std': jnp.std(logits, axis=-1).mean(),
  }


# Host side: the metrics.jsonl record.

def _to_python(tree: Any) -> Any:
  """Device arrays -> floats / lists of floats, for JSON."""
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64).tolist(), jax.device_get(tree))


def record(step: int, metrics: dict, cfg: ModelConfig, time_s: float) -> dict:
  """The metrics.jsonl record of a layer-stats step (its metrics, as returned by train_step)."""
  stats = _to_python(metrics['layer_stats'])
  stats['attn_entropy_uniform'] = uniform_entropy(cfg.block_size)
  return {'step': step, 'train_loss': float(metrics['loss']), 'lr': float(metrics['lr']),
          'grad_norm': float(metrics['grad_norm']), 'time': round(time_s, 3), 'layer_stats': stats}
