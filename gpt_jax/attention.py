"""Attention kernels, and the one place that chooses among them (`attend`).

The model's CausalSelfAttention projects q, k, v and calls `attend`; everything about *how* the
softmax(q k^T / sqrt(D)) v is computed lives here:
  * `causal_attention`, the written-out softmax (the reference; it alone can drop attention
    probabilities with the step's own key, and show them);
  * `block_causal_attention`, the same a block of query rows at a time, skipping the blocks right of
    the diagonal (long sequences);
  * `cached_attention`, new tokens over a KV cache (generation);
  * jax.nn.dot_product_attention, XLA's or cuDNN's fused kernel;
  * gpt_jax/flash_attention.py, our Pallas flash-attention kernel, which can drop attention
    probabilities (with a hashed mask) and so train. `attention_implementation` decides.

Shapes: B = batch, T = new positions, S = cache length (= block_size), H = heads, D = head size.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp

from gpt_jax import flash_attention
from gpt_jax.config import ModelConfig
from gpt_jax.errors import UserError


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     dropout_rate: float = 0.0, dropout_rng: Optional[jax.Array] = None,
                     probs_hook: Optional[Callable] = None, dropout_seed: Any = None) -> jax.Array:
  """softmax(q k^T / sqrt(D) + mask) v, written out.  q: (B, H, T, D); k, v: (B, H, S, D).

  Heads come before positions, so both products are plain batched matrix products over (B, H)
  that need no transposes (measured faster on a CPU than (B, T, H, D); docs/performance.md has the
  figure).
  `mask` (T, S) is True where query t may look at key s. Scores and softmax are in float32.
  With a `dropout_rng`, attention probabilities are dropped with `dropout_rate` (survivors scaled by
  1 / (1 - rate)), as in GPT-2 / nanoGPT; with a uint32 `dropout_seed` instead, by the flash kernel's
  hashed mask (gpt_jax/flash_attention.py). `probs_hook`, if given, sees the probabilities.
  Returns (B, H, T, D).
  """
  D = q.shape[-1]
  att = jnp.einsum('bhtd,bhsd->bhts', q, k, preferred_element_type=jnp.float32)  # (B, H, T, S)
  att = att * (1.0 / math.sqrt(D))
  att = jnp.where(mask, att, -jnp.inf)  # Future positions get probability exactly 0.
  # Softmax by hand: subtract the row max for stability (each row has at least its own position, so
  # the max is finite), exponentiate, normalise. The softmax does not depend on the constant
  # subtracted, so its gradient through the max is exactly zero: stop_gradient saves computing it.
  att = jnp.exp(att - jax.lax.stop_gradient(jnp.max(att, axis=-1, keepdims=True)))
  att = att / jnp.sum(att, axis=-1, keepdims=True)
  if probs_hook is not None:
    probs_hook(att)  # (B, H, T, S) before dropout; the model sows them for gpt_jax/training/layer_stats.py.
  if dropout_rng is not None and dropout_rate > 0.0:
    from gpt_jax.model import dropout  # Here, not at the top: the model imports this module.
    att = dropout(att, dropout_rate, dropout_rng)
  elif dropout_seed is not None and dropout_rate > 0.0:
    att = flash_attention.hashed_dropout(att, dropout_rate, dropout_seed)
  y = jnp.einsum('bhts,bhsd->bhtd', att.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return y.astype(v.dtype)  # (B, H, T, D)


# Query rows per block in `block_causal_attention` (training and full forwards longer than this).
QUERY_BLOCK = 64


def block_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int = QUERY_BLOCK,
                           dropout_rate: float = 0.0, dropout_rng: Optional[jax.Array] = None,
                           ) -> jax.Array:
  """`causal_attention` of a whole sequence (q, k, v: (B, H, T, D)), `block` query rows at a time.

  Query block [s, e) can only see keys [0, e): the blocks of the (T, T) score matrix right of the
  diagonal are entirely masked, so they are never computed (the causal skip of flash attention).
  With T = 256 and blocks of 64 that is 3/8 of the attention work, scores, softmax and dropout
  included. Same values as `causal_attention`; with dropout each block draws its own mask.
  """
  T = q.shape[2]
  out = []
  for i, s in enumerate(range(0, T, block)):
    e = min(s + block, T)
    mask = jnp.arange(e)[None, :] <= jnp.arange(s, e)[:, None]  # (e - s, e)
    rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
    out.append(causal_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], mask, dropout_rate, rng))
  return jnp.concatenate(out, axis=2)  # (B, H, T, D)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array,
                     v_cache: jax.Array, pos: Any) -> jax.Array:
  """Attention of a chunk of T new tokens at positions [pos, pos + T) over the cache and itself.

  q, k, v: (B, H, T, D) of the new tokens; k_cache, v_cache: (B, H, S, D), valid below `pos`.
  The same softmax as `causal_attention` over the keys [cache[:pos], k], computed as two score
  blocks that share one max and one normaliser, so the cache is only *read* here. The caller writes
  k, v into the cache afterwards, which lets XLA update it in place (`write_cache`).
  Returns (B, H, T, D).
  """
  T, S, D = q.shape[2], k_cache.shape[2], q.shape[-1]
  scale = 1.0 / math.sqrt(D)
  old = jnp.einsum('bhtd,bhsd->bhts', q, k_cache, preferred_element_type=jnp.float32) * scale
  old = jnp.where(jnp.arange(S)[None, :] < pos, old, -jnp.inf)  # (B, H, T, S): the past.
  new = jnp.einsum('bhtd,bhsd->bhts', q, k, preferred_element_type=jnp.float32) * scale
  new = jnp.where(jnp.arange(T)[None, :] <= jnp.arange(T)[:, None], new, -jnp.inf)  # (B, H, T, T)
  m = jax.lax.stop_gradient(jnp.maximum(jnp.max(old, axis=-1, keepdims=True),
                                        jnp.max(new, axis=-1, keepdims=True)))
  old, new = jnp.exp(old - m), jnp.exp(new - m)
  norm = jnp.sum(old, axis=-1, keepdims=True) + jnp.sum(new, axis=-1, keepdims=True)
  y = (jnp.einsum('bhts,bhsd->bhtd', old.astype(v.dtype), v_cache, preferred_element_type=jnp.float32)
       + jnp.einsum('bhts,bhsd->bhtd', new.astype(v.dtype), v, preferred_element_type=jnp.float32))
  return (y / norm).astype(v.dtype)  # (B, H, T, D)


def _after(x: jax.Array, y: jax.Array) -> jax.Array:
  """x, as a value that depends on y (same shape): x itself unless y is NaN (then 0).

  XLA:CPU updates a loop-carried KV cache in place only when it can see that the update comes after
  every read of the cache; without a data dependency it copies the whole cache (twice) per token.
  """
  return jnp.where(jnp.isnan(y), jnp.zeros_like(x), x)


# cuDNN's fused (flash) attention, as jax.nn.dot_product_attention(implementation='cudnn') checks it
# (jax/_src/cudnn/fused_attention_stablehlo.py): bf16/fp16 inputs and a head size that is a multiple of
# 8, at most 128 (256 from Hopper on; 128 is the bound that holds on every GPU).
CUDNN_DTYPES = ('bfloat16', 'float16')
CUDNN_MAX_HEAD_SIZE = 128


def cudnn_problem(cfg: ModelConfig, platform: str) -> Optional[str]:
  """Why cuDNN flash attention cannot run this model on `platform` ('cpu', 'gpu', ...); None if it can."""
  if platform not in ('gpu', 'cuda'):
    return f'it needs an NVIDIA GPU (this run is on {platform})'
  if cfg.dtype not in CUDNN_DTYPES:
    return f'it takes only bfloat16/float16 inputs (model.dtype={cfg.dtype!r})'
  if cfg.head_size % 8 or cfg.head_size > CUDNN_MAX_HEAD_SIZE:
    return (f'it needs a head size (n_embd // n_head) that is a multiple of 8 and at most '
            f'{CUDNN_MAX_HEAD_SIZE} (got {cfg.head_size})')
  return None


# Head sizes the flash kernel takes: powers of two (Triton's tiles are powers of two on every side),
# from its smallest tile to the largest that fits its registers.
FLASH_HEAD_SIZES = (16, 32, 64, 128, 256)
GPU_PLATFORMS = ('gpu', 'cuda')


def flash_problem(cfg: ModelConfig) -> Optional[str]:
  """Why our Pallas flash kernel (gpt_jax/flash_attention.py) cannot run this model; None if it can.
  It takes every model.dtype, and pads sequences to whole blocks, so any length is fine."""
  if cfg.head_size not in FLASH_HEAD_SIZES:
    return (f'it needs a head size (n_embd // n_head) in {FLASH_HEAD_SIZES} (got {cfg.head_size})')
  if cfg.block_size > flash_attention.MAX_POSITIONS:
    return (f'its dropout hash numbers at most {flash_attention.MAX_POSITIONS} positions '
            f'(model.block_size={cfg.block_size})')
  return None


# The platform programs are being built for, when it is not JAX's default backend (`target_platform`).
_TARGET_PLATFORM: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    'gpt_jax_target_platform', default=None)


@contextlib.contextmanager
def target_platform(platform: str) -> Iterator[None]:
  """Traces inside choose attention for `platform` (e.g. 'cuda' while lowering for a GPU on a CPU)."""
  token = _TARGET_PLATFORM.set(platform)
  try:
    yield
  finally:
    _TARGET_PLATFORM.reset(token)


def _platform(platform: Optional[str] = None) -> str:
  """`platform`, else `target_platform`'s, else JAX's default backend."""
  return platform or _TARGET_PLATFORM.get() or jax.default_backend()


def attention_implementation(cfg: ModelConfig, drop_probs: bool, platform: Optional[str] = None,
                             ) -> str:
  """The one place that decides which kernel a full forward (or prefill) uses: 'manual', 'xla',
  'cudnn' or 'flash'.

  `drop_probs`: this call drops attention probabilities (training, dropout > 0, attention_dropout).
  `platform`: the backend the program is for (default: `target_platform`'s, else JAX's default).
    manual  the written-out softmax (block-causal for long sequences): always.
    xla     jax.nn.dot_product_attention(implementation='xla'), except when attention probabilities
            are dropped, which only the written-out softmax can do with the step's own key.
    cudnn   implementation='cudnn' (flash attention), or a UserError saying why it cannot run here.
    flash   our Pallas kernel (gpt_jax/flash_attention.py), dropout included, or a UserError saying
            why it cannot (flash_problem). Off a GPU it runs in Pallas interpret mode: slow.
    auto    when attention probabilities are dropped: 'flash' on a GPU where it applies, else
            'manual'; otherwise cuDNN where it applies (cudnn_problem), else as 'xla'.
  jax.nn.dot_product_attention cannot drop attention probabilities: it has no dropout, and cuDNN's
  in-kernel dropout takes its seed as a compile-time constant and advances its own counter, so a
  step would no longer be a pure function of (seed, step) and resumed runs would not repeat. The
  flash kernel's mask is a hash of (seed, batch, head, query, key) with the seed from the step's key.
  """
  want = cfg.attention
  if want == 'manual':
    return 'manual'
  platform = _platform(platform)
  if want == 'flash':
    if problem := flash_problem(cfg):
      raise UserError(f"model.attention='flash': the Pallas flash-attention kernel cannot run this "
                      f"model: {problem}. Use model.attention='auto' or 'manual'.")
    return 'flash'
  problem = cudnn_problem(cfg, platform)
  if want == 'cudnn':
    if problem:
      raise UserError(f"model.attention='cudnn': cuDNN flash attention cannot run this model: "
                      f"{problem}. Use model.attention='auto' (cuDNN where it applies, else XLA).")
    if drop_probs:
      raise UserError("model.attention='cudnn' cannot drop attention probabilities (see "
                      "docs/gpu.md); set model.attention_dropout=False (embedding and residual "
                      "dropout stay), or model.attention='auto' to train with the flash kernel.")
    return 'cudnn'
  if drop_probs:
    on_gpu = platform in GPU_PLATFORMS
    return 'flash' if want == 'auto' and on_gpu and flash_problem(cfg) is None else 'manual'
  return 'cudnn' if want == 'auto' and problem is None else 'xla'


def describe_attention(cfg: ModelConfig, platform: Optional[str] = None) -> str:
  """What a run uses, in words, e.g. 'cudnn (training and evals)' (printed at start-up)."""
  train = attention_implementation(cfg, cfg.dropout > 0 and cfg.attention_dropout, platform)
  evals = attention_implementation(cfg, False, platform)
  why = ''
  if cfg.attention != 'manual' and train == 'manual':
    why = ' (attention dropout needs the written-out softmax; model.attention_dropout=False lifts it)'
  setting = f'model.attention={cfg.attention!r}'
  if 'flash' in (train, evals) and _platform(platform) not in GPU_PLATFORMS:
    setting += f'; flash runs in Pallas interpret mode on {_platform(platform)}: correct but slow'
  if train == evals:
    return f'{train} (training and evals; {setting})'
  return f'{train} in training{why}, {evals} in evals ({setting})'


def write_cache(cache: dict[str, jax.Array], k: jax.Array, v: jax.Array, y: jax.Array,
                pos: Any) -> dict[str, jax.Array]:
  """The cache with this chunk's keys/values (B, H, T, D) written at [pos, pos + T).

  The new values are made to depend on the attention output y (`_after`), so that XLA sees every
  read of the cache come first and updates it in place.
  """
  write = lambda c, new: jax.lax.dynamic_update_slice(c, _after(new, y).astype(c.dtype), (0, 0, pos, 0))
  return {'k': write(cache['k'], k), 'v': write(cache['v'], v)}


def attend(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array,
           cache: Optional[dict[str, jax.Array]] = None, pos: Any = 0,
           dropout_rng: Optional[jax.Array] = None,
           probs_hook: Optional[Callable[[jax.Array], Any]] = None,
           ) -> tuple[jax.Array, Optional[dict[str, jax.Array]]]:
  """Causal attention of q, k, v (B, H, T, D) at positions [pos, pos + T): (y (B, H, T, D), cache).

  With a `cache` (generation), the new tokens also attend over the cache's past, and their keys and
  values are written into it. `dropout_rng`: drop attention probabilities (training) with that key.
  `probs_hook` asks for the probabilities, which only the written-out full (T, T) path has; it never
  changes the function computed, only the kernel.
  """
  T = q.shape[2]
  prefill = cache is not None and isinstance(pos, int) and pos == 0  # Nothing cached to read yet.
  impl = attention_implementation(cfg, dropout_rng is not None)
  if cache is not None and not prefill:
    # Generation: the new tokens attend over the cache's past and, causally, over each other.
    y = cached_attention(q, k, v, cache['k'], cache['v'], pos)
  elif impl == 'flash':
    # The Pallas kernel, its dropout mask hashed from a seed drawn from this layer's dropout key.
    seed = None if dropout_rng is None else jax.random.bits(dropout_rng, (1,), jnp.uint32)
    rate = cfg.dropout if seed is not None else 0.0
    if probs_hook is None:
      y = flash_attention.flash_attention(q, k, v, seed, rate,
                                          interpret=_platform() not in GPU_PLATFORMS)
    else:  # The same function written out, so that the probabilities exist to be seen.
      y = causal_attention(q, k, v, jnp.tril(jnp.ones((T, T), bool)), rate, probs_hook=probs_hook,
                           dropout_seed=seed)
  elif impl in ('xla', 'cudnn') and probs_hook is None:
    # jax.nn.dot_product_attention with the implementation named explicitly (its default, None,
    # is XLA in every JAX so far). It takes and returns (B, T, H, D).
    q_, k_, v_ = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    y = jax.nn.dot_product_attention(q_, k_, v_, is_causal=True, implementation=impl)
    y = y.transpose(0, 2, 1, 3)  # (B, H, T, D)
  elif T > QUERY_BLOCK and probs_hook is None:
    # Training / full forward of a long sequence: skip the fully masked blocks.
    y = block_causal_attention(q, k, v, QUERY_BLOCK, cfg.dropout, dropout_rng)
  else:
    y = causal_attention(q, k, v, jnp.tril(jnp.ones((T, T), bool)), cfg.dropout, dropout_rng,
                         probs_hook=probs_hook)
  if cache is not None:
    cache = write_cache(cache, k, v, y, pos)
  return y, cache
