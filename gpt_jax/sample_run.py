"""Sampling around the generation loop: a checkpoint and a prompt in, printed text out (scripts/sample.py).

`sample_from_checkpoint` loads a run, encodes the prompt, and generates with `sampling.generate`, which
Ctrl-C stops between chunks. `generate_uncached` is the plain full-recomputation reference with the same
window rule; greedy decoding gives identical tokens with both (tests/test_sampling.py).
`generate_in_one_program` is `generate` without chunks, for lowering the whole loop at once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.config import ModelConfig, SampleConfig
from gpt_jax.model import GPT
from gpt_jax.sampling import _STATIC, _chunk, _prefill, _schedule, generate, resolve_shift

_FIELDS = {f.name for f in dataclasses.fields(SampleConfig)}


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


@functools.partial(jax.jit, static_argnames=_STATIC)
def generate_in_one_program(params: Any, prompt: jax.Array, key: jax.Array, **kw) -> jax.Array:
  """`sampling.generate` as one program, without chunks (to lower and inspect it whole)."""
  P = prompt.shape[1]
  _, fill, rounds = _schedule(kw['cfg'], P, kw['max_new_tokens'], kw['shift'])
  carry = _prefill(params, prompt, key, **kw)
  carry = _chunk(params, carry, key, 0, fill, 0, rounds, P=P, **kw)
  return carry[0][:, :P + kw['max_new_tokens']]


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


def sample_from_checkpoint(ckpt_dir: str, *, step: Optional[int] = None, prompt: Optional[str] = None,
                           prompt_file: Optional[str] = None, num_samples: Optional[int] = None,
                           max_new_tokens: Optional[int] = None, temperature: Optional[float] = None,
                           top_k: Optional[int] = None, seed: Optional[int] = None,
                           window_shift: Optional[int] = None, verbose: bool = True) -> list[str]:
  """Loads a checkpoint directory and prints (and returns) `num_samples` continuations of a prompt.

  A setting left None is the run's own (the `sample` section of the config it was trained with), else
  SampleConfig's default: a run made with the `tiny` preset samples its 64 tokens unless told otherwise.
  """
  from gpt_jax import checkpoint as checkpoint_lib, config_checks, files
  from gpt_jax.data import tokenizer as tokenizer_lib
  from gpt_jax.errors import UserError
  given = {k: v for k, v in dict(prompt=prompt, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, seed=seed,
                                 window_shift=window_shift).items() if v is not None}
  if prompt_file:
    given['prompt'] = files.read_text(prompt_file, '--prompt_file')
  if given.get('prompt') == '':
    raise UserError('the prompt is empty; give at least one character (e.g. --prompt "\\n").')
  config_checks.raise_problems(config_checks.check_sampling(given, prefix='--'), 'invalid arguments')

  cfg, params, meta = checkpoint_lib.load_for_inference(ckpt_dir, step)
  run = meta.get('config', {}).get('sample', {})  # Checked when the run was made.
  s = {**dataclasses.asdict(SampleConfig()), **{k: v for k, v in run.items() if k in _FIELDS}, **given}
  prompt, num_samples, max_new_tokens = s['prompt'] or '\n', s['num_samples'], s['max_new_tokens']
  temperature, top_k, seed, window_shift = s['temperature'], s['top_k'], s['seed'], s['window_shift']
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
