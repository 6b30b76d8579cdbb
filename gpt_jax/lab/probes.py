"""Inference-side probes of a trained model: attention maps, token traces, head scores, a copying test.

`attention_maps` and `token_trace` are the tools behind scripts/attention.py and scripts/trace.py;
they use the statistics forward pass of gpt_jax/training/layer_stats.py. `head_scores` measures what
each head attends to (the previous token, the start of the line, the start of the word), and
`copy_losses` whether the model predicts a phrase better the second time it reads it.
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


HEAD_PATTERNS = ('previous token', 'line start', 'word start')


def attention_targets(labels: Sequence[str]) -> dict[str, np.ndarray]:
  """For each pattern of HEAD_PATTERNS, the key position each query should attend to (-1: none).

  labels are the tokens' texts. 'previous token': t - 1. 'line start': the most recent newline, the
  token that opens the line; 'word start': the most recent whitespace, the token that opens the word.
  The two starts count only where they lie before t - 1, so that neither is the previous token (nor
  the query itself).
  """
  T = len(labels)
  targets = {name: np.full(T, -1) for name in HEAD_PATTERNS}
  targets['previous token'][1:] = np.arange(T - 1)
  line = word = -1
  for t in range(T):
    if labels[t].endswith('\n'):
      line = t
    if labels[t][-1:].isspace():
      word = t
    for name, start in (('line start', line), ('word start', word)):
      if 0 <= start < t - 1:
        targets[name][t] = start
  return targets


def head_scores(maps: np.ndarray, labels: Sequence[str]) -> dict[str, np.ndarray]:
  """{pattern: (n_layer, n_head) mean attention weight on the pattern's key, over the queries it has}.

  maps: (L, H, T, T) from `attention_maps`. A head that always attends to the previous token scores
  1 for 'previous token'; uniform attention over t + 1 positions scores about 1 / (t + 1).
  """
  out = {}
  for name, target in attention_targets(labels).items():
    queries = np.flatnonzero(target >= 0)
    on_target = maps[:, :, queries, target[queries]]  # (L, H, queries)
    out[name] = on_target.mean(axis=-1) if len(queries) else np.zeros(maps.shape[:2])
  return out


def mean_head_scores(params: Any, cfg: ModelConfig, tok: Any, windows: Sequence[Sequence[int]]
                     ) -> dict[str, np.ndarray]:
  """`head_scores` averaged over several token windows (each at most block_size long)."""
  per = [head_scores(attention_maps(params, cfg, w), [token_text(tok, i) for i in w]) for w in windows]
  return {name: np.mean([p[name] for p in per], axis=0) for name in HEAD_PATTERNS}


def best_pattern(scores: dict[str, np.ndarray]) -> list[list[str]]:
  """A title per head naming its highest-scoring pattern, e.g. 'L0 H3: previous token 0.82'."""
  L, H = next(iter(scores.values())).shape
  titles = []
  for l in range(L):
    row = []
    for h in range(H):
      name = max(scores, key=lambda n: scores[n][l, h])
      row.append(f'L{l} H{h}: {name} {scores[name][l, h]:.2f}')
    titles.append(row)
  return titles


def copy_losses(params: Any, cfg: ModelConfig, tok: Any, phrase: str, before: str = '',
                between: str = ' ') -> tuple[float, float]:
  """Mean loss (nats/token) on `phrase` the first and the second time the model reads it.

  The text is before + phrase + between + phrase; each occurrence is scored on its tokens after its
  first (which nothing in the text announces). A model that copies from its context does far
  better the second time.
  """
  a, p, m = tok.encode(before), tok.encode(phrase), tok.encode(between)
  ids = a + p + m + p
  if len(ids) - 1 > cfg.block_size:
    raise UserError(f'the copying text is {len(ids)} tokens; the model reads at most {cfg.block_size + 1}.')
  nll = [-math.log(max(r.prob, 1e-30)) for r in token_trace(params, cfg, ids, top_k=1)]  # nll[t]: ids[t+1]
  first = len(a)  # ids[first] is the phrase's first token; nll[first + i - 1] scores ids[first + i].
  second = len(a) + len(p) + len(m)
  return (float(np.mean(nll[first:first + len(p) - 1])), float(np.mean(nll[second:second + len(p) - 1])))


def load(ckpt_dir: str, step: Optional[int] = None) -> tuple[ModelConfig, Any, Any]:
  """(model config, params, tokenizer) of a checkpoint."""
  from gpt_jax import checkpoint
  from gpt_jax.data import tokenizer
  cfg, params, meta = checkpoint.load_for_inference(ckpt_dir, step)
  return cfg, params, tokenizer.tokenizer_from_dict(meta['tokenizer'])
