"""Full, deterministic evaluation of a checkpoint on the validation split, comparable across tokenizers.

Training's val loss is an estimate from random windows. Here every validation token is scored exactly
once, in order:

  * The validation split follows the training split in the text, so its first token is predicted from
    the last training token; the sequence scored is [train[-1]] + val, and all `val_tokens` targets
    count.
  * It is cut into non-overlapping windows of `block_size` targets; window w feeds
    seq[w*T : w*T + T] and scores seq[w*T + 1 : w*T + T + 1]. The last window is usually partial: it
    is padded, and the padded positions are masked out of the sum. (Tokens early in a window see
    little context, so this is slightly pessimistic compared with a sliding window, and cheaper.)
  * Logits of padded vocabulary rows (model vocab > tokenizer vocab, e.g. 50304 vs 50257) are masked,
    so probabilities are over real tokens only: the distribution sampling draws from.

Loss per token depends on the tokenizer (a BPE token carries several characters), so models with
different tokenizers are compared by bits per character:

  bits/char = total negative log-likelihood (nats) / ln 2 / characters of the validation text.

For a character model one token is one character, so bits/char = loss / ln 2.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from gpt_jax import checkpoint as checkpoint_lib
from gpt_jax.config import ModelConfig
from gpt_jax.data import text as text_lib, tokenizer as tokenizer_lib
from gpt_jax.errors import UserError
from gpt_jax.model import GPT

# Automatic batch size: keep one batch's float32 logits (B * T * V * 4 bytes) near 256 MB.
_LOGITS_BUDGET = 1 << 26


def auto_batch_size(cfg: ModelConfig) -> int:
  """Windows per batch: at most 64, fewer for large vocabularies so the logits fit in memory."""
  return int(max(1, min(64, _LOGITS_BUDGET // (cfg.block_size * cfg.vocab_size))))


def make_windows(tokens: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Inputs, targets and mask (W, T) that score tokens[1:] exactly once each, in order.

  W = ceil((len(tokens) - 1) / T); the tail of the last window is padding with mask 0.
  """
  n = len(tokens) - 1  # Targets.
  if n < 1:
    raise UserError('the validation split has no tokens to score; use more text or a larger '
                    'data.val_fraction.')
  T = block_size
  W = -(-n // T)
  padded = np.zeros(W * T + 1, np.int32)
  padded[:n + 1] = tokens
  mask = (np.arange(W * T) < n).reshape(W, T)
  return padded[:-1].reshape(W, T), padded[1:].reshape(W, T), mask


def window_batches(tokens: np.ndarray, block_size: int, batch_size: int
                   ) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], int]:
  """`make_windows` in batches of `batch_size` windows, (x, y, mask) each, and the number of targets.

  The last batch is padded with fully masked windows: every batch has one shape, so a jitted scorer
  compiles once.
  """
  x, y, mask = make_windows(np.asarray(tokens), block_size)
  pad = -x.shape[0] % batch_size
  x, y, mask = (np.concatenate([a, np.zeros((pad, a.shape[1]), a.dtype)]) for a in (x, y, mask))
  batches = [(x[i:i + batch_size], y[i:i + batch_size], mask[i:i + batch_size])
             for i in range(0, x.shape[0], batch_size)]
  return batches, int(mask.sum())


def val_tokens(ds: text_lib.Dataset) -> np.ndarray:
  """The tokens that score the val split: the last train token, then val. The first val token is
  predicted from the text it follows."""
  return np.concatenate([np.asarray(ds.train[-1:], np.int32), np.asarray(ds.val, np.int32)])


@functools.partial(jax.jit, static_argnames=('cfg', 'vocab_limit'))
def window_nll(params: Any, x: jax.Array, y: jax.Array, mask: jax.Array, *, cfg: ModelConfig,
               vocab_limit: int) -> jax.Array:
  """Summed negative log-likelihood (nats) of the masked targets of each window: (B, T) -> (B,)."""
  logits = GPT(cfg).apply({'params': params}, x)  # (B, T, V) float32, dropout off.
  V = logits.shape[-1]
  if vocab_limit < V:  # Padded vocabulary rows are not tokens: no probability mass for them.
    logits = jnp.where(jnp.arange(V) < vocab_limit, logits, -jnp.inf)
  target_logit = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - target_logit  # (B, T)
  return jnp.sum(jnp.where(mask, nll, 0.0), axis=-1)


def score_tokens(params: Any, cfg: ModelConfig, tokens: np.ndarray, *, batch_size: int = 0,
                 vocab_limit: Optional[int] = None, progress: bool = False) -> tuple[float, int]:
  """(total nats, number of targets) for scoring tokens[1:] in non-overlapping windows.

  Batches have one fixed shape (the last is padded with fully masked windows), so `window_nll`
  compiles once. Sums are accumulated on the host in float64.
  """
  batches, n = window_batches(tokens, cfg.block_size, batch_size or auto_batch_size(cfg))
  limit = int(vocab_limit or cfg.vocab_size)
  total = 0.0
  for x, y, mask in tqdm(batches, desc='evaluate', unit='batch', disable=not progress or None):
    sums = window_nll(params, x, y, mask, cfg=cfg, vocab_limit=limit)
    total += float(np.sum(np.asarray(sums, np.float64)))
  return total, n


def _open_data(meta: dict[str, Any], data_dir: Optional[str], verbose: bool) -> text_lib.Dataset:
  """The prepared data: `data_dir` if given, else the data section saved in the checkpoint."""
  if data_dir:
    return text_lib.Dataset(os.path.expanduser(data_dir))
  saved = (meta.get('config') or {}).get('data')
  if not saved:
    raise UserError('the checkpoint does not record its data settings; pass --data_dir with the '
                    'prepared data it was trained on.')
  try:
    # Prepares the data again if it is missing or stale (the BPE training is deterministic).
    return text_lib.load(ml_collections.ConfigDict(saved), verbose=verbose)
  except UserError as e:
    raise UserError(f'{e} (evaluating with the data settings saved in the checkpoint: data_dir '
                    f'{saved.get("data_dir")!r}; pass --data_dir to use another prepared folder)'
                    ) from None


def run_dir(ckpt_dir: str) -> str:
  """A run's out_dir, given it or its checkpoints/ folder."""
  path = os.path.abspath(os.path.expanduser(ckpt_dir))
  return os.path.dirname(path) if os.path.basename(path) == 'checkpoints' else path


def evaluate_checkpoint(ckpt_dir: str, *, step: Optional[int] = None, data_dir: Optional[str] = None,
                        batch_size: int = 0, output: Optional[str] = None,
                        verbose: bool = True) -> dict[str, Any]:
  """Scores the whole validation split with a checkpoint; prints and writes the results as JSON.

  The tokenizer is the one stored in the checkpoint; the data's tokenizer must be identical to it.
  `output` defaults to `<run dir>/eval.json`; '' writes nothing.
  """
  if batch_size < 0:
    raise UserError(f'--batch_size must be >= 0 (0 = automatic), got {batch_size}')
  cfg, params, meta = checkpoint_lib.load_for_inference(ckpt_dir, step)
  tok = tokenizer_lib.tokenizer_from_dict(meta['tokenizer'])
  ds = _open_data(meta, data_dir, verbose)
  if ds.tokenizer.to_dict() != meta['tokenizer']:
    raise UserError(
        f'the data in {ds.data_dir} was prepared with another tokenizer ({ds.meta["tokenizer"]}, '
        f'vocab {ds.tokenizer.vocab_size:,}) than the checkpoint ({tok.vocab_size:,} tokens); pass '
        '--data_dir with the data the model was trained on, or prepare it with the same data.* '
        'settings.')
  if tok.vocab_size > cfg.vocab_size:
    raise UserError(f'the checkpoint\'s model has {cfg.vocab_size} outputs but its tokenizer '
                    f'{tok.vocab_size} ids; the checkpoint is inconsistent.')

  tokens = val_tokens(ds)
  chars = int(ds.meta['val_chars'])
  if len(tokens) == len(ds.val):  # No training text at all: the first val token cannot be scored.
    chars -= len(tok.decode(tokens[:1]))
  B = batch_size or auto_batch_size(cfg)
  t0 = time.perf_counter()
  total, n = score_tokens(params, cfg, tokens, batch_size=B, vocab_limit=tok.vocab_size,
                          progress=verbose)
  seconds = time.perf_counter() - t0
  loss = total / n
  result = {
      'ckpt_dir': os.path.abspath(os.path.expanduser(ckpt_dir)),
      'step': int(meta['step']),
      'data_dir': os.path.abspath(ds.data_dir),
      'tokenizer': ds.meta['tokenizer'],
      'vocab_size': tok.vocab_size,
      'model_vocab_size': cfg.vocab_size,
      'block_size': cfg.block_size,
      'batch_size': B,
      'train_tokens': int(ds.meta['train_tokens']),
      'val_tokens': int(ds.meta['val_tokens']),
      'val_chars': chars,
      'scored_tokens': n,
      'total_nats': total,
      'loss': loss,
      'perplexity': math.exp(loss),
      'bits_per_token': loss / math.log(2),
      'bits_per_char': total / math.log(2) / chars,
      'chars_per_token': chars / n,
      'seconds': round(seconds, 3),
  }
  if verbose:
    print(f'checkpoint step {result["step"]}, {result["tokenizer"]} tokenizer (vocab '
          f'{tok.vocab_size:,}, model {cfg.vocab_size:,}); validation: {n:,} tokens, {chars:,} '
          f'characters, {chars / n:.3f} characters/token')
    print(f'loss {loss:.4f} nats/token, perplexity {result["perplexity"]:.2f}, '
          f'{result["bits_per_char"]:.4f} bits/character ({seconds:.1f}s)')
  if output is None:
    output = os.path.join(run_dir(ckpt_dir), 'eval.json')
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=1)
    if verbose:
      print(f'wrote {output}')
  return result
