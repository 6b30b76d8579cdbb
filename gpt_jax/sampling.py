"""Text generation: a jitted `lax.fori_loop` over a KV cache, with a sliding window.

Inside the window each new token is one forward pass of one position against the cache. GPT-2's
position table has only `block_size` rows, so past the window the model re-encodes the most recent
`block_size - shift + 1` tokens from position 0 every `shift` tokens (cached keys/values carry their old
positions and cannot be shifted). shift = 1 is nanoGPT's exact "crop to the last block_size tokens and
recompute"; larger shifts amortise that cost. sample_run.generate_uncached is the cache-free reference.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.config import ModelConfig
from gpt_jax.model import GPT, init_cache


def resolve_shift(cfg: ModelConfig, window_shift: int) -> int:
  """0 means 'auto' (a quarter of the window); otherwise clamp to [1, block_size]."""
  return max(1, cfg.block_size // 4) if window_shift <= 0 else min(int(window_shift), cfg.block_size)


def _pick(logits: jax.Array, key: jax.Array, temperature: float, top_k: Optional[int],
          vocab_limit: int) -> jax.Array:
  """Chooses the next token from logits (B, V): greedy when temperature == 0, else sampled."""
  if vocab_limit < logits.shape[-1]:  # Padded vocabulary rows are never valid tokens.
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None and 0 < top_k < vocab_limit:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1): the k-th largest logit per row.
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


CHUNK = 256  # Tokens generated per jitted call: between calls a stop request (Ctrl-C) is noticed.
_STATIC = ('cfg', 'max_new_tokens', 'temperature', 'top_k', 'shift', 'vocab_limit')


def _steps(params: Any, key: jax.Array, P: int, cfg: ModelConfig, max_new_tokens: int,
           temperature: float, top_k: Optional[int], shift: int, vocab_limit: int):
  """The three moves of the decoding loop, for a prompt of length P: (encode_window, extend, slide)."""
  model = GPT(cfg)
  keep = cfg.block_size - shift + 1  # Tokens re-encoded when the window is full.

  def encode_window(tokens: jax.Array, end: jax.Array, length: int) -> tuple[jax.Array, Any]:
    """Fresh cache from tokens[end - length : end] at positions 0..length-1; logits of the last."""
    B = tokens.shape[0]
    window = jax.lax.dynamic_slice(tokens, (0, end - length), (B, length))
    logits, cache = model.apply({'params': params}, window, init_cache(cfg, B), 0, method=GPT.decode)
    return logits[:, -1], cache

  def choose(i: jax.Array, tokens: jax.Array, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Picks new token number i from `logits` and writes it at tokens[:, P + i]."""
    nxt = _pick(logits, jax.random.fold_in(key, i), temperature, top_k, vocab_limit)
    return nxt, jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, P + i))

  def extend(i, carry):  # Room left in the window: one position against the cache.
    tokens, cache, n_ctx, logits = carry
    nxt, tokens = choose(i, tokens, logits)
    logits, cache = model.apply({'params': params}, nxt[:, None], cache, n_ctx, method=GPT.decode)
    return tokens, cache, n_ctx + 1, logits[:, -1]

  def slide(i, carry):  # Window full: re-encode the most recent `keep` tokens from position 0.
    tokens, _, _, logits = carry
    _, tokens = choose(i, tokens, logits)
    logits, cache = encode_window(tokens, P + i + 1, keep)
    return tokens, cache, jnp.asarray(keep, jnp.int32), logits

  return encode_window, extend, slide


def _schedule(cfg: ModelConfig, P: int, max_new_tokens: int, shift: int) -> tuple[int, int, int]:
  """(first, fill, rounds): tokens prefilled, extends until the window is full, rounds of one slide and up
  to shift - 1 extends. Static, so plain loops with no `lax.cond` let XLA update the cache in place."""
  S = cfg.block_size
  first = P if P <= S else S - shift + 1  # The prompt, or its most recent part when longer than S.
  fill = min(max_new_tokens, S - first)
  return first, fill, -(-(max_new_tokens - fill) // shift)


def _prefill(params: Any, prompt: jax.Array, key: jax.Array, *, cfg: ModelConfig, max_new_tokens: int,
             temperature: float, top_k: Optional[int], shift: int, vocab_limit: int) -> tuple:
  """The decoding carry (tokens, cache, n_ctx, logits) after encoding the prompt."""
  B, P = prompt.shape
  encode_window = _steps(params, key, P, cfg, max_new_tokens, temperature, top_k, shift, vocab_limit)[0]
  # At least S long so that the re-encoding traces a valid slice even when it never runs.
  tokens = jnp.zeros((B, max(P + max_new_tokens, cfg.block_size)), jnp.int32).at[:, :P].set(prompt)
  first, _, _ = _schedule(cfg, P, max_new_tokens, shift)
  logits, cache = encode_window(tokens, P, first)
  return tokens, cache, jnp.asarray(first, jnp.int32), logits


def _chunk(params: Any, carry: tuple, key: jax.Array, fill_lo: jax.Array, fill_hi: jax.Array,
           round_lo: jax.Array, round_hi: jax.Array, *, P: int, cfg: ModelConfig, max_new_tokens: int,
           temperature: float, top_k: Optional[int], shift: int, vocab_limit: int) -> tuple:
  """New tokens fill_lo .. fill_hi - 1 of the fill (extends only), then rounds round_lo .. round_hi - 1
  past it. One program for both phases, so that one compilation serves every chunk."""
  _, extend, slide = _steps(params, key, P, cfg, max_new_tokens, temperature, top_k, shift, vocab_limit)
  _, fill, _ = _schedule(cfg, P, max_new_tokens, shift)
  carry = jax.lax.fori_loop(fill_lo, fill_hi, extend, carry)

  def round_(r, carry):
    i = fill + r * shift  # The token chosen by this round's slide.
    carry = slide(i, carry)
    return jax.lax.fori_loop(i + 1, jnp.minimum(i + shift, max_new_tokens), extend, carry)

  return jax.lax.fori_loop(round_lo, round_hi, round_, carry)


_prefill_jit = jax.jit(_prefill, static_argnames=_STATIC)
_chunk_jit = jax.jit(_chunk, static_argnames=_STATIC + ('P',), donate_argnums=1)


def generate(params: Any, cfg: ModelConfig, prompt: np.ndarray | jax.Array, max_new_tokens: int,
             key: jax.Array, temperature: float = 1.0, top_k: Optional[int] = None, window_shift: int = 0,
             vocab_limit: Optional[int] = None, stop: Optional[Callable[[], bool]] = None) -> jax.Array:
  """Continues `prompt` (B, P) int ids by `max_new_tokens`; returns (B, P + max_new_tokens).

  temperature 0 = greedy; `top_k` keeps the k most likely tokens; `vocab_limit` (default: the model's
  vocab) masks padded rows. Made in jitted chunks of about CHUNK (each token is chosen with the key
  folded with its own index, so chunking changes none); `stop()`, asked between chunks, ends early,
  returning (B, P + the tokens made so far).
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError('prompt must have shape (batch, length) with length >= 1')
  P = prompt.shape[1]
  kw = dict(cfg=cfg, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
            top_k=None if not top_k else int(top_k), shift=resolve_shift(cfg, window_shift),
            vocab_limit=int(vocab_limit or cfg.vocab_size))
  _, fill, rounds = _schedule(cfg, P, kw['max_new_tokens'], shift := kw['shift'])
  carry = _prefill_jit(params, prompt, key, **kw)
  per_call = max(1, CHUNK // shift)  # Chunks of ~CHUNK new tokens: the fill in pieces, then whole rounds.
  bounds = ([(lo, min(lo + CHUNK, fill), 0, 0) for lo in range(0, fill, CHUNK)]
            + [(fill, fill, lo, min(lo + per_call, rounds)) for lo in range(0, rounds, per_call)])
  done = 0  # New tokens made so far.
  for f_lo, f_hi, r_lo, r_hi in bounds:
    if stop is not None and stop():
      return carry[0][:, :P + done]
    carry = _chunk_jit(params, carry, key, *map(jnp.int32, (f_lo, f_hi, r_lo, r_hi)), P=P, **kw)
    done = min(f_hi + r_hi * shift, kw['max_new_tokens']) if r_hi else f_hi
    if stop is not None:
      carry[0].block_until_ready()  # So that a stop is seen after this chunk, not after all of them.
  return carry[0][:, :P + kw['max_new_tokens']]
