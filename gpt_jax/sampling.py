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
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.config import ModelConfig, SampleConfig
from gpt_jax.model import GPT, init_cache

_S = SampleConfig()  # The defaults of sample_from_checkpoint (scripts/sample.py's flags).


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
    logits, cache = model.apply({'params': params}, window, init_cache(cfg, B), 0,
                                method=GPT.decode)
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
  """(first, fill, rounds): the prompt tokens prefilled, the extends until the window is full, then the
  rounds of one slide followed by up to shift - 1 extends. The schedule is static: plain loops with no
  `lax.cond` inside let XLA update the cache in place."""
  S = cfg.block_size
  first = P if P <= S else S - shift + 1  # The prompt, or its most recent part when longer than S.
  fill = min(max_new_tokens, S - first)
  return first, fill, -(-(max_new_tokens - fill) // shift)


def _prefill(params: Any, prompt: jax.Array, key: jax.Array, *, cfg: ModelConfig, max_new_tokens: int,
             temperature: float, top_k: Optional[int], shift: int, vocab_limit: int) -> tuple:
  """The decoding carry (tokens, cache, n_ctx, logits) after encoding the prompt."""
  B, P = prompt.shape
  encode_window, _, _ = _steps(params, key, P, cfg, max_new_tokens, temperature, top_k, shift,
                               vocab_limit)
  # At least S long so that the re-encoding traces a valid slice even when it never runs.
  tokens = jnp.zeros((B, max(P + max_new_tokens, cfg.block_size)), jnp.int32).at[:, :P].set(prompt)
  first, _, _ = _schedule(cfg, P, max_new_tokens, shift)
  logits, cache = encode_window(tokens, P, first)
  return tokens, cache, jnp.asarray(first, jnp.int32), logits


def _chunk(params: Any, carry: tuple, key: jax.Array, fill_lo: jax.Array, fill_hi: jax.Array,
           round_lo: jax.Array, round_hi: jax.Array, *, P: int, cfg: ModelConfig, max_new_tokens: int,
           temperature: float, top_k: Optional[int], shift: int, vocab_limit: int) -> tuple:
  """New tokens fill_lo .. fill_hi - 1 of the fill (the window still has room: extends only), then
  rounds round_lo .. round_hi - 1 past it (each one slide, then up to shift - 1 extends). One program
  for both phases, so that one compilation serves every chunk."""
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


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate(params: Any, prompt: jax.Array, key: jax.Array, **kw) -> jax.Array:
  """All of it in one program (as `generate` without chunks; for lowering it whole)."""
  P = prompt.shape[1]
  _, fill, rounds = _schedule(kw['cfg'], P, kw['max_new_tokens'], kw['shift'])
  carry = _prefill(params, prompt, key, **kw)
  carry = _chunk(params, carry, key, 0, fill, 0, rounds, P=P, **kw)
  return carry[0][:, :P + kw['max_new_tokens']]


def generate(params: Any, cfg: ModelConfig, prompt: np.ndarray | jax.Array, max_new_tokens: int,
             key: jax.Array, temperature: float = 1.0, top_k: Optional[int] = None,
             window_shift: int = 0, vocab_limit: Optional[int] = None,
             stop: Optional[Callable[[], bool]] = None) -> jax.Array:
  """Continues `prompt` (B, P) int ids by `max_new_tokens`; returns (B, P + max_new_tokens).

  temperature 0 = greedy. `top_k` keeps only the k most likely tokens. `vocab_limit` (default: the
  model's vocab) masks padded vocabulary rows. `window_shift`: see the module docstring. The tokens are
  made in jitted chunks of about CHUNK; `stop()`, asked between chunks, ends generation early: the
  result is then shorter, (B, P + the tokens made so far). Chunking changes no token: each is chosen
  with the key folded with its own index, by the same computation.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError('prompt must have shape (batch, length) with length >= 1')
  P = prompt.shape[1]
  kw = dict(cfg=cfg, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
            top_k=None if not top_k else int(top_k), shift=resolve_shift(cfg, window_shift),
            vocab_limit=int(vocab_limit or cfg.vocab_size))
  shift = kw['shift']
  _, fill, rounds = _schedule(cfg, P, kw['max_new_tokens'], shift)
  carry = _prefill_jit(params, prompt, key, **kw)
  # Chunks of about CHUNK new tokens: first the fill in pieces, then whole rounds of `shift` tokens.
  per_call = max(1, CHUNK // shift)
  bounds = ([(lo, min(lo + CHUNK, fill), 0, 0) for lo in range(0, fill, CHUNK)]
            + [(fill, fill, lo, min(lo + per_call, rounds)) for lo in range(0, rounds, per_call)])
  done = 0  # New tokens made so far.
  for f_lo, f_hi, r_lo, r_hi in bounds:
    if stop is not None and stop():
      return carry[0][:, :P + done]
    i32 = jnp.int32
    carry = _chunk_jit(params, carry, key, i32(f_lo), i32(f_hi), i32(r_lo), i32(r_hi), P=P, **kw)
    done = min(f_hi + r_hi * shift, kw['max_new_tokens']) if r_hi else f_hi
    if stop is not None:
      carry[0].block_until_ready()  # So that a stop is seen after this chunk, not after all of them.
  return carry[0][:, :P + kw['max_new_tokens']]


def generate_uncached(params: Any, cfg: ModelConfig, prompt: np.ndarray, max_new_tokens: int,
                      window_shift: int = 0) -> np.ndarray:
  """Greedy decoding by full recomputation each step, with the same window rule (a reference)."""
  model = GPT(cfg)
  S = cfg.block_size

  @jax.jit
  def last_logits(p, window, n):
    # Right-padding to S keeps one compiled shape; causality makes logits[n - 1] independent of it.
    return model.apply({'params': p}, window)[:, n - 1]

  keep = S - resolve_shift(cfg, window_shift) + 1
  tokens = np.asarray(prompt, np.int32)
  start = 0  # The window is tokens[start:].
  for _ in range(max_new_tokens):
    if tokens.shape[1] - start > S:
      start = tokens.shape[1] - keep
    window = tokens[:, start:]
    padded = np.pad(window, ((0, 0), (0, S - window.shape[1])))
    logits = last_logits(params, jnp.asarray(padded), window.shape[1])
    tokens = np.concatenate([tokens, np.asarray(jnp.argmax(logits, -1), np.int32)[:, None]], axis=1)
  return tokens


def encode_prompt(tok: Any, prompt: str, flag: str) -> list[int]:
  """The ids of a prompt; one it cannot encode is reported as the prompt's problem, under its `flag`.

  As in data preparation, special-token text in a prompt ('<|endoftext|>') is ordinary text.
  """
  from gpt_jax.data import text as text_lib
  from gpt_jax.errors import UserError
  try:
    return text_lib.encode_text(tok, prompt)
  except UserError as e:
    why = str(e).replace('the text contains', 'it contains').split(' Remove or replace')[0]
    known = ''.join(c for c in sorted(getattr(tok, 'stoi', {})) if c.isalpha())[:1]
    example = f' (e.g. {flag}={known!r})' if known else ''
    raise UserError(f'the prompt {prompt[:40]!r} ({flag}) cannot be encoded: {why}. Give a prompt made '
                    f'of characters of the training text{example}.') from None


def sample_from_checkpoint(ckpt_dir: str, *, step: Optional[int] = None, prompt: str = _S.prompt,
                           prompt_file: Optional[str] = None, num_samples: int = _S.num_samples,
                           max_new_tokens: int = _S.max_new_tokens, temperature: float = _S.temperature,
                           top_k: int = _S.top_k, seed: int = _S.seed, window_shift: int = _S.window_shift,
                           verbose: bool = True) -> list[str]:
  """Loads a checkpoint directory and prints (and returns) `num_samples` continuations of a prompt."""
  from gpt_jax import checkpoint as checkpoint_lib, config_checks, files
  from gpt_jax.data import tokenizer as tokenizer_lib
  from gpt_jax.errors import UserError
  if prompt_file:
    prompt = files.read_text(prompt_file, '--prompt_file')
  if not prompt:
    raise UserError('the prompt is empty; give at least one character (e.g. --prompt "\\n").')
  config_checks.raise_problems(config_checks.check_sampling(dict(
      num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
      window_shift=window_shift), prefix='--'), 'invalid arguments')

  cfg, params, meta = checkpoint_lib.load_for_inference(ckpt_dir, step)
  tok = tokenizer_lib.tokenizer_from_dict(meta['tokenizer'])
  ids = np.array([encode_prompt(tok, prompt, '--prompt_file' if prompt_file else '--prompt')]
                 * num_samples, np.int32)
  if verbose:
    loss = f', val loss {meta["val_loss"]:.4f}' if math.isfinite(meta['val_loss']) else ''
    print(f'checkpoint step {meta["step"]}{loss}: {cfg.n_layer} layers x {cfg.n_embd} wide, '
          f'vocab {tok.vocab_size}')
  with _StopOnInterrupt() as stop:  # Ctrl-C ends generation after the chunk in flight.
    out = generate(params, cfg, ids, max_new_tokens, jax.random.PRNGKey(seed), temperature, top_k,
                   window_shift, tok.vocab_size, stop=stop)
  texts = [tok.decode(np.asarray(row)) for row in out]
  if verbose:
    for i, text in enumerate(texts):
      print(f'---------- sample {i + 1}/{len(texts)} ----------')
      print(text, flush=True)
  if stop.requested:  # What was generated is printed above; the caller sees the interruption.
    raise KeyboardInterrupt(f'stopped after {out.shape[1] - ids.shape[1]} of {max_new_tokens} tokens')
  return texts


class _StopOnInterrupt:
  """While active, SIGINT (Ctrl-C) only sets `requested`, which generation checks between chunks; a
  second Ctrl-C interrupts at once. Outside the main thread (where signals cannot be caught) a no-op."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __call__(self) -> bool:
    return self.requested

  def _handle(self, signum, frame):
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True

  def __enter__(self) -> '_StopOnInterrupt':
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    import signal
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
