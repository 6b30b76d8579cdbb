"""Inference-side probes of a trained model: attention maps and token traces.

`attention_maps` and `token_trace` are the tools behind scripts/attention.py and scripts/trace.py;
they use the statistics forward pass of gpt_jax/training/layer_stats.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.config import ModelConfig
from gpt_jax.errors import UserError
from gpt_jax.model import GPT
from gpt_jax.training.layer_stats import forward_with_intermediates


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
  from gpt_jax import checkpoint
  from gpt_jax.data import tokenizer
  cfg, params, meta = checkpoint.load_for_inference(ckpt_dir, step)
  return cfg, params, tokenizer.tokenizer_from_dict(meta['tokenizer'])
