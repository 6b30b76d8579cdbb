"""Text generation: a jitted `lax.fori_loop` over a KV cache, with a sliding window.

Within the context window every new token costs one forward pass of one position against the cache.
GPT-2's position table only has `block_size` rows, so once the text outgrows the window the model
must be re-run on a recent part of the text with positions renumbered from 0 (cached keys/values
carry their old positions and cannot simply be shifted). We re-encode the most recent
`block_size - shift + 1` tokens every `shift` tokens:

  * shift = 1 re-encodes the last `block_size` tokens for every new token: exactly nanoGPT's
    "crop to the last block_size tokens and recompute", at full-recompute cost past the window;
  * larger shifts amortise that cost; the model then always sees at least `block_size - shift + 1`
    tokens of context.

`generate_uncached` is the plain full-recomputation reference with the same window rule; greedy
decoding gives identical tokens with both (tests/test_sample.py).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.config import ModelConfig
from gpt_jax.model import GPT, init_cache


def resolve_shift(cfg: ModelConfig, window_shift: int) -> int:
  """0 means 'auto' (a quarter of the window); otherwise clamp to [1, block_size]."""
  if window_shift <= 0:
    return max(1, cfg.block_size // 4)
  return min(int(window_shift), cfg.block_size)


def _pick(logits: jax.Array, key: jax.Array, temperature: float, top_k: Optional[int],
          vocab_limit: int) -> jax.Array:
  """Chooses the next token from logits (B, V): greedy when temperature == 0, else sampled."""
  V = logits.shape[-1]
  if vocab_limit < V:  # Padded vocabulary rows are never valid tokens.
    logits = jnp.where(jnp.arange(V) < vocab_limit, logits, -jnp.inf)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None and 0 < top_k < vocab_limit:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1): the k-th largest logit per row.
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('cfg', 'max_new_tokens', 'temperature', 'top_k',
                                              'shift', 'vocab_limit'))
def _generate(params: Any, prompt: jax.Array, key: jax.Array, *, cfg: ModelConfig,
              max_new_tokens: int, temperature: float, top_k: Optional[int], shift: int,
              vocab_limit: int) -> jax.Array:
  model = GPT(cfg)
  B, P = prompt.shape
  S = cfg.block_size
  keep = S - shift + 1  # Tokens re-encoded when the window is full.
  total = P + max_new_tokens
  tokens = jnp.zeros((B, total), jnp.int32).at[:, :P].set(prompt)

  def encode_window(tokens: jax.Array, end: jax.Array, length: int) -> tuple[jax.Array, Any]:
    """Fresh cache from tokens[end - length : end] at positions 0..length-1; logits of the last."""
    window = jax.lax.dynamic_slice(tokens, (0, end - length), (B, length))
    logits, cache = model.apply({'params': params}, window, init_cache(cfg, B), 0,
                                method=GPT.decode)
    return logits[:, -1], cache

  # Prefill with the prompt, or its most recent part when it is longer than the window.
  first = P if P <= S else keep
  logits, cache = encode_window(tokens, P, first)

  def body(i, carry):
    tokens, cache, n_ctx, logits = carry
    t = P + i  # Index of the token chosen now.
    nxt = _pick(logits, jax.random.fold_in(key, i), temperature, top_k, vocab_limit)
    tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, t))

    def extend(_):  # Room left in the window: one position against the cache.
      lg, c = model.apply({'params': params}, nxt[:, None], cache, n_ctx, method=GPT.decode)
      return lg[:, -1], c, n_ctx + 1

    def slide(_):  # Window full: re-encode the most recent `keep` tokens from position 0.
      lg, c = encode_window(tokens, t + 1, keep)
      return lg, c, jnp.asarray(keep, jnp.int32)

    logits, cache, n_ctx = jax.lax.cond(n_ctx < S, extend, slide, None)
    return tokens, cache, n_ctx, logits

  carry = (tokens, cache, jnp.asarray(first, jnp.int32), logits)
  tokens = jax.lax.fori_loop(0, max_new_tokens, body, carry)[0]
  return tokens


def generate(params: Any, cfg: ModelConfig, prompt: np.ndarray | jax.Array, max_new_tokens: int,
             key: jax.Array, temperature: float = 1.0, top_k: Optional[int] = None,
             window_shift: int = 0, vocab_limit: Optional[int] = None) -> jax.Array:
  """Continues `prompt` (B, P) int ids by `max_new_tokens`; returns (B, P + max_new_tokens).

  temperature 0 = greedy. `top_k` keeps only the k most likely tokens. `vocab_limit` (default: the
  model's vocab) masks padded vocabulary rows. `window_shift`: see the module docstring.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError('prompt must have shape (batch, length) with length >= 1')
  return _generate(params, prompt, key, cfg=cfg, max_new_tokens=int(max_new_tokens),
                   temperature=float(temperature), top_k=None if not top_k else int(top_k),
                   shift=resolve_shift(cfg, window_shift),
                   vocab_limit=int(vocab_limit or cfg.vocab_size))


def generate_uncached(params: Any, cfg: ModelConfig, prompt: np.ndarray, max_new_tokens: int,
                      window_shift: int = 0) -> np.ndarray:
  """Greedy decoding by full recomputation each step, with the same window rule (a reference)."""
  model = GPT(cfg)
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x))
  S = cfg.block_size
  keep = S - resolve_shift(cfg, window_shift) + 1
  tokens = np.asarray(prompt, np.int32)
  start = 0  # The window is tokens[start:].
  for _ in range(max_new_tokens):
    if tokens.shape[1] - start > S:
      start = tokens.shape[1] - keep
    logits = forward(params, jnp.asarray(tokens[:, start:]))[:, -1]
    tokens = np.concatenate([tokens, np.asarray(jnp.argmax(logits, -1), np.int32)[:, None]], axis=1)
  return tokens
