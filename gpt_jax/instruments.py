"""Seeing inside a training run: per-layer training dynamics, attention maps and token traces.

Training dynamics (`dynamics`, called inside the jitted train step every `train.dynamics_interval`
steps). One metrics.jsonl record per such step, a normal train record plus a nested 'dynamics' dict:

  {"step": 50, "train_loss": 2.31, "lr": 0.001, "grad_norm": 0.84, "time": 12.3,
   "dynamics": {
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
they describe the model without dropout noise). That pass always uses the manual attention path, which
records the attention probabilities; `attention='xla'` computes the same function.

Cost: train.py compiles the step twice, plain and instrumented, and runs the instrumented one only on
interval steps, so every other step is the unchanged program. On the cpu preset an instrumented step
took ~12 ms (10-18%) longer than a plain one: +0.4% per step averaged over dynamics_interval=50.
Computing the instruments under `lax.cond` in one step function instead cost 1-4% on *every* step.

`TensorBoardLog` mirrors metrics.jsonl records as TensorBoard scalars (tensorboardX, imported lazily).
`attention_maps` and `token_trace` are the inference-side tools behind scripts/attention.py and
scripts/trace.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gpt_jax.config import ModelConfig
from gpt_jax.errors import UserError
from gpt_jax.model import GPT

ACT_ROWS = 8  # Batch rows of the statistics forward pass: 8 * block_size positions is plenty for means.


# ---------------------------------------------------------------------------------------------------
# Pure functions of arrays (jit-friendly).

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
  model = GPT(dataclasses.replace(cfg, attention='manual', dropout=0.0))
  logits, state = model.apply({'params': params}, idx, mutable=['intermediates'])
  inter = state['intermediates']
  blocks = [inter[f'h_{i}'] for i in range(cfg.n_layer)]
  return logits, {'embed': inter['embed'][0],
                  'resid': [b['resid'][0] for b in blocks],
                  'attn_probs': [b['attn']['attn_probs'][0] for b in blocks]}


def dynamics(cfg: ModelConfig, params: Any, new_params: Any, grads: Any,
             x: jax.Array) -> dict[str, Any]:
  """The per-layer dynamics of one optimizer step (see the module docstring); call inside jit.

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


# ---------------------------------------------------------------------------------------------------
# Host side: records for metrics.jsonl, TensorBoard.

def _to_python(tree: Any) -> Any:
  """Device arrays -> floats / lists of floats, for JSON."""
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64).tolist(), jax.device_get(tree))


def record(step: int, metrics: dict, cfg: ModelConfig, time_s: float) -> dict:
  """The metrics.jsonl record of an instrumented step (its metrics, as returned by train_step)."""
  dyn = _to_python(metrics['dynamics'])
  dyn['attn_entropy_uniform'] = uniform_entropy(cfg.block_size)
  return {'step': step, 'train_loss': float(metrics['loss']), 'lr': float(metrics['lr']),
          'grad_norm': float(metrics['grad_norm']), 'time': round(time_s, 3), 'dynamics': dyn}


def flatten(tree: Any, prefix: str = '') -> dict[str, float]:
  """{'a': {'b': 1, 'c': [2, 3]}} -> {'a/b': 1, 'a/c/0': 2, 'a/c/1': 3}; non-numbers are dropped."""
  out = {}
  items = tree.items() if isinstance(tree, dict) else enumerate(tree)
  for k, v in items:
    name = f'{prefix}{k}'
    if isinstance(v, (dict, list, tuple)):
      out.update(flatten(v, name + '/'))
    elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
      out[name] = float(v)
  return out


class TensorBoardLog:
  """Wraps a metrics.jsonl log: every record is also written as TensorBoard scalars.

  Tags: eval records under 'eval/' (train_loss, val_loss), per-step log records under 'train/',
  dynamics under 'dynamics/<metric>/<layer>' (attention entropy per head: '.../h_0/<head>'), eval
  samples as text. View with `tensorboard --logdir OUT_DIR/tensorboard`.
  """

  def __init__(self, log: Any, logdir: str):
    try:
      from tensorboardX import SummaryWriter  # Lazy: only runs with train.tensorboard=True need it.
    except ImportError:
      raise UserError('train.tensorboard=True needs the tensorboardX package: '
                      'pip install tensorboardX') from None
    self.log = log
    self.writer = SummaryWriter(logdir)

  def write(self, rec: dict) -> None:
    self.log.write(rec)
    if 'event' in rec or 'step' not in rec:
      return
    step = int(rec['step'])
    if 'dynamics' in rec:
      scalars = flatten(rec['dynamics'], 'dynamics/')
    else:
      group = 'eval/' if 'val_loss' in rec else 'train/'
      scalars = flatten({k: v for k, v in rec.items() if k not in ('step', 'time')}, group)
      if 'sample' in rec:
        self.writer.add_text('sample', rec['sample'], step)
    for tag, value in scalars.items():
      self.writer.add_scalar(tag, value, step)
    self.writer.flush()  # Records are rare (log/eval intervals); keep the event file current.


# ---------------------------------------------------------------------------------------------------
# Inference-side tools: attention maps and token traces of a trained model.

def token_text(tok: Any, token_id: int) -> str:
  """The text of one token; a BPE piece that is part of a UTF-8 character shows its bytes (\\xe2)."""
  if hasattr(tok, 'token_bytes'):
    return tok.token_bytes(int(token_id)).decode('utf-8', errors='backslashreplace')
  return tok.decode([int(token_id)])


def token_label(tok: Any, token_id: int) -> str:
  """A readable one-line label: escapes such as \\n, and quotes when there is outer whitespace."""
  text = token_text(tok, token_id)
  shown = ''.join(c if c.isprintable() else repr(c)[1:-1] for c in text)  # '\n' -> \n
  return shown if text and text.strip() == text else f"'{shown}'"


def attention_maps(params: Any, cfg: ModelConfig, ids: Sequence[int]) -> np.ndarray:
  """Attention probabilities of one sequence: (n_layer, n_head, T, T), row t = query position t."""
  idx = jnp.asarray([list(ids)], jnp.int32)
  _, inter = jax.jit(forward_with_intermediates, static_argnums=1)(params, cfg, idx)
  return np.stack([np.asarray(p[0]) for p in inter['attn_probs']])


@dataclasses.dataclass
class TraceRow:
  """What the model predicted after seeing tokens [0, pos]."""
  pos: int
  token: int                    # The token at `pos` (last one seen).
  next_token: int               # The actual next token.
  prob: float                   # Model probability of `next_token`.
  rank: int                     # 1 = the model's top choice.
  top: list[tuple[int, float]]  # The k most likely next tokens with their probabilities.


def token_trace(params: Any, cfg: ModelConfig, ids: Sequence[int], top_k: int = 5) -> list[TraceRow]:
  """For every position of `ids` but the last, the model's view of the next token.

  The model reads ids[:-1] (at most block_size tokens); position t is scored on ids[t + 1].
  """
  idx = jnp.asarray([list(ids)[:-1]], jnp.int32)
  logits = jax.jit(lambda p, i: GPT(cfg).apply({'params': p}, i))(params, idx)[0]  # (T - 1, V)
  probs = np.asarray(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), np.float64)
  rows = []
  for t in range(len(ids) - 1):
    p, nxt = probs[t], int(ids[t + 1])
    order = np.argsort(-p, kind='stable')
    rows.append(TraceRow(pos=t, token=int(ids[t]), next_token=nxt, prob=float(p[nxt]),
                         rank=int(np.sum(p > p[nxt])) + 1,
                         top=[(int(j), float(p[j])) for j in order[:top_k]]))
  return rows


def format_trace(rows: Sequence[TraceRow], tok: Any) -> str:
  """The trace as a text table, with the mean loss (nats/token) at the end."""
  width = max([6] + [len(token_label(tok, r.token)) for r in rows] +
              [len(token_label(tok, r.next_token)) for r in rows]) + 2
  head = f'{"pos":>4}  {"token":<{width}}{"next":<{width}}{"p(next)":>8} {"rank":>5}   top alternatives'
  lines = [head, '-' * len(head)]
  for r in rows:
    alts = '  '.join(f'{token_label(tok, j)} {q:.3f}' for j, q in r.top)
    lines.append(f'{r.pos:>4}  {token_label(tok, r.token):<{width}}{token_label(tok, r.next_token):<{width}}'
                 f'{r.prob:>8.4f} {r.rank:>5}   {alts}')
  if rows:
    nll = -np.mean([math.log(max(r.prob, 1e-30)) for r in rows])
    top1 = np.mean([r.rank == 1 for r in rows])
    lines.append(f'\n{len(rows)} predictions: mean loss {nll:.4f} nats/token (perplexity '
                 f'{math.exp(nll):.2f}), top-1 accuracy {100 * top1:.1f}%')
  return '\n'.join(lines)


def encode_for_model(tok: Any, cfg: ModelConfig, text: str, extra: int = 0) -> tuple[list[int], str]:
  """Encodes `text`, keeping at most block_size + extra tokens; returns (ids, note about cropping)."""
  if not text:
    raise UserError('--text is empty; give the model something to read.')
  ids = tok.encode(text)
  limit = cfg.block_size + extra
  if len(ids) > limit:
    return ids[:limit], (f'note: the text is {len(ids)} tokens; only the first {limit} fit the '
                         f'context window (block_size {cfg.block_size}).')
  return ids, ''


def load(ckpt_dir: str, step: Optional[int] = None) -> tuple[ModelConfig, Any, Any]:
  """(model config, params, tokenizer) of a checkpoint."""
  from gpt_jax import checkpoint, tokenizer
  cfg, params, meta = checkpoint.load_for_inference(ckpt_dir, step)
  return cfg, params, tokenizer.tokenizer_from_dict(meta['tokenizer'])
