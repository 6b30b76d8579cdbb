"""GPT-2 in Flax Linen, written out by hand in one file.

Read it top to bottom: LayerNorm and Linear (the two parameterised building blocks), causal
self-attention, the MLP, a pre-LN transformer block, and the GPT that stacks them. Parameter names
follow GPT-2 / nanoGPT so weights map one-to-one: `wte`, `wpe`, `h_0 ... h_{L-1}` each with `ln_1`,
`attn.c_attn`, `attn.c_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`, and the final `ln_f`.

Shapes: B = batch, T = sequence length, C = n_embd, H = n_head, D = head size (C // H),
S = cache length (= block_size), V = vocab size.

Things that differ from Flax's defaults on purpose (GPT-2 faithfulness):
  * weights are initialised N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 L)), biases zero
    (Flax's Dense would use lecun_normal);
  * LayerNorm epsilon is 1e-5 (Flax's is 1e-6);
  * GELU is exact (erf) by default as in nanoGPT, or the tanh form GPT-2 used (`gelu_approximate`);
    written out here (`jax.nn.gelu` defaults to tanh, and its exact form is slower on CPU).

Options that leave GPT-2 (issue 14's speedrun levers; all off by default, see ModelConfig):
  * position='rotary': no `wpe`; q and k of every head are rotated by their position (RoPE), so
    attention scores depend only on the distance between query and key;
  * qk_norm: q and k are RMS-normalised per head (`attn.q_norm`, `attn.k_norm`, each a learned
    head-size scale) before the dot product;
  * activation='relu2': the MLP uses relu(x)^2 instead of GELU;
  * zero_init_proj: `attn.c_proj` and `mlp.c_proj` kernels start at zero, so every block starts as
    the identity on the residual stream.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.config import ModelConfig
from gpt_jax.errors import UserError

# A KV cache: for every layer a dict with 'k' and 'v' of shape (B, H, S, D) (head-major, as attention).
Cache = tuple[dict[str, jax.Array], ...]


class LayerNorm(nn.Module):
  """y = (x - mean) / sqrt(var + eps) * scale + bias over the last axis, statistics in float32."""
  use_bias: bool = True
  epsilon: float = 1e-5  # GPT-2's value; flax.linen.LayerNorm defaults to 1e-6.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    C = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (C,), jnp.float32)
    x32 = x.astype(jnp.float32)  # Mean/variance in float32 even when computing in bfloat16.
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)  # Biased variance, as GPT-2.
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (C,), jnp.float32)
    return y.astype(x.dtype)


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale over the last axis, in float32; no centring, no bias."""
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (y * scale).astype(x.dtype)


class Linear(nn.Module):
  """y = x @ kernel + bias, kernel of shape (in, out) like GPT-2's Conv1D weight."""
  features: int
  use_bias: bool = True
  std: float = 0.02         # Kernel init N(0, std^2); 0 = all zeros.
  dtype: Any = jnp.float32  # Compute dtype; the parameters themselves stay float32.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = x.shape[-1]
    init = nn.initializers.zeros if self.std == 0 else nn.initializers.normal(self.std)
    kernel = self.param('kernel', init, (n_in, self.features), jnp.float32)
    # Multiply as one 2-D (B*T, in) @ (in, out) GEMM: the same maths as a (B, T, in) contraction, but
    # it hands XLA the canonical matmul for the forward *and* for the weight gradient, which on CPU is
    # several times faster than a contraction over two batch-like axes.
    # The result is in the compute dtype, as under torch.autocast (GPUs accumulate a bf16 GEMM in
    # float32 inside the kernel either way). Asking for a float32 result instead would make the
    # gradient's cotangent float32, and so run both backward GEMMs in float32 (tf32 on a GPU).
    y = jnp.dot(x.reshape(-1, n_in).astype(self.dtype), kernel.astype(self.dtype),
                preferred_element_type=self.dtype)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
    return y.reshape(*x.shape[:-1], self.features)


def gelu(x: jax.Array, approximate: bool = False) -> jax.Array:
  """GELU(x) = x * Phi(x). Exact: 0.5 x (1 + erf(x / sqrt(2))), the formula PyTorch's F.gelu uses.

  `approximate`: GPT-2's tanh form, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
  (jax.nn.gelu's exact form goes through erfc, about twice as slow on a CPU for the same values.)
  """
  if approximate:
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
  return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def relu2(x: jax.Array) -> jax.Array:
  """ReLU squared, relu(x)^2 (Primer; modded-nanogpt's MLP): sparse like ReLU, smooth at 0."""
  return jnp.square(jnp.maximum(x, 0))


def rotary(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding (RoPE, Su et al.) of x: (..., T, D) at `positions` (T,).

  Dimension pairs (i, i + D/2) (the half-split layout of GPT-NeoX and Llama) are rotated by the
  angle position * base^(-2i/D). A rotation by angle a*p of q and by a*s of k leaves
  q . k dependent on p - s only, which is what makes attention scores relative. In float32.
  """
  D = x.shape[-1]
  inv_freq = jnp.asarray(base ** (-np.arange(0, D, 2) / D), jnp.float32)  # (D/2,), in float64 first.
  angle = jnp.asarray(positions, jnp.float32)[:, None] * inv_freq[None, :]  # (T, D/2)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :D // 2], x32[..., D // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Zeroes each element with probability `rate` and scales the survivors by 1 / (1 - rate).

  The keep/drop decision compares 16 random bits with round(rate * 2^16), so two elements share one
  32-bit draw: half the random numbers of `jax.random.bernoulli`, whose generator is most of the cost
  of dropout on a CPU. The rate is thus a multiple of 2^-16 (0.2 -> 0.199997), and survivors are
  scaled by the exact inverse of the keep probability actually used, so E[dropout(x)] = x.
  """
  threshold = min(round(rate * 65536), 65535)
  n = x.size
  bits = jax.random.bits(rng, ((n + 1) // 2,), jnp.uint32)
  bits16 = jax.lax.bitcast_convert_type(bits, jnp.uint16).reshape(-1)[:n].reshape(x.shape)
  keep = bits16 >= jnp.uint16(threshold)
  return jnp.where(keep, x * (65536.0 / (65536 - threshold)), 0.0).astype(x.dtype)


class Dropout(nn.Module):
  """`dropout` as a module drawing from the 'dropout' PRNG stream (like flax.linen.Dropout)."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    return dropout(x, self.rate, self.make_rng('dropout'))


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     dropout_rate: float = 0.0, dropout_rng: Optional[jax.Array] = None,
                     probs_hook: Optional[Callable[[jax.Array], Any]] = None) -> jax.Array:
  """softmax(q k^T / sqrt(D) + mask) v, written out.  q: (B, H, T, D); k, v: (B, H, S, D).

  Heads come before positions, so both products are plain batched matrix products over (B, H)
  that need no transposes (measured faster on a CPU than (B, T, H, D); docs/performance.md has the
  figure).
  `mask` (T, S) is True where query t may look at key s. Scores and softmax are in float32.
  With a `dropout_rng`, attention probabilities are dropped with `dropout_rate` (and the survivors
  scaled by 1 / (1 - rate)), as in GPT-2 / nanoGPT. `probs_hook`, if given, sees the probabilities.
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
    att = dropout(att, dropout_rate, dropout_rng)
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
  k, v into the cache afterwards, which lets XLA update it in place (see CausalSelfAttention).
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


def attention_implementation(cfg: ModelConfig, drop_probs: bool, platform: Optional[str] = None,
                             ) -> str:
  """The one place that decides which kernel a full forward (or prefill) uses: 'manual', 'xla', 'cudnn'.

  `drop_probs`: this call drops attention probabilities (training, dropout > 0, attention_dropout).
  `platform`: the backend the program is for (default: `target_platform`'s, else JAX's default).
    manual  the written-out softmax (block-causal for long sequences): always.
    xla     jax.nn.dot_product_attention(implementation='xla'), except when attention probabilities
            are dropped, which only the written-out softmax can do with the step's own key.
    cudnn   implementation='cudnn' (flash attention), or a UserError saying why it cannot run here.
    auto    cuDNN where it applies (cudnn_problem), else as 'xla'.
  No fused kernel drops attention probabilities: jax.nn.dot_product_attention has no dropout, and
  cuDNN's in-kernel dropout takes its seed as a compile-time constant and advances its own counter,
  so a step would no longer be a pure function of (seed, step) and resumed runs would not repeat.
  """
  want = cfg.attention
  if want == 'manual':
    return 'manual'
  platform = platform or _TARGET_PLATFORM.get() or jax.default_backend()
  problem = cudnn_problem(cfg, platform)
  if want == 'cudnn':
    if problem:
      raise UserError(f"model.attention='cudnn': cuDNN flash attention cannot run this model: "
                      f"{problem}. Use model.attention='auto' (cuDNN where it applies, else XLA).")
    if drop_probs:
      raise UserError("model.attention='cudnn' cannot drop attention probabilities (see "
                      "docs/gpu.md); set model.attention_dropout=False (embedding and residual "
                      "dropout stay), or model.attention='auto' to train on the written-out softmax.")
    return 'cudnn'
  if drop_probs:
    return 'manual'
  return 'cudnn' if want == 'auto' and problem is None else 'xla'


def describe_attention(cfg: ModelConfig, platform: Optional[str] = None) -> str:
  """What a run uses, in words, e.g. 'cudnn (training and evals)' (printed at start-up)."""
  train = attention_implementation(cfg, cfg.dropout > 0 and cfg.attention_dropout, platform)
  evals = attention_implementation(cfg, False, platform)
  why = ''
  if cfg.attention != 'manual' and train == 'manual':
    why = ' (attention dropout needs the written-out softmax; model.attention_dropout=False lifts it)'
  if train == evals:
    return f'{train} (training and evals; model.attention={cfg.attention!r})'
  return f'{train} in training{why}, {evals} in evals (model.attention={cfg.attention!r})'


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention with an optional KV cache for generation.

  `record_probs` asks for the attention probabilities (sown as 'intermediates'/'attn_probs'), which
  only the written-out full (T, T) path has: the per-layer statistics pass sets it explicitly
  (gpt_jax/training/layer_stats.py). It never changes the function computed, only the kernel.
  """
  config: ModelConfig
  record_probs: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool, cache: Optional[dict[str, jax.Array]] = None,
               pos: Any = 0) -> tuple[jax.Array, Optional[dict[str, jax.Array]]]:
    cfg = self.config
    B, T, C = x.shape
    H, D = cfg.heads, cfg.head_size  # One head of size C with the 'heads' ablation.
    dtype = jnp.dtype(cfg.dtype)
    # GPT-2: scale residual projections by 1/sqrt(N) (or start them at 0 with zero_init_proj).
    resid_std = 0.0 if cfg.zero_init_proj else 0.02 / math.sqrt(2 * cfg.n_layer)

    qkv = Linear(3 * C, cfg.bias, dtype=dtype, name='c_attn')(x)  # (B, T, 3C)
    # One transpose puts q, k, v head-major: (B, T, 3, H, D) -> (3, B, H, T, D).
    q, k, v = qkv.reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)  # Each (B, H, T, D).
    if cfg.qk_norm:
      # RMSNorm over each head's D dimensions, with a learned (D,) scale shared by the heads. RMS, not
      # LayerNorm: the point is to bound |q| and |k| (and so the logits) whatever the residual stream
      # grows to; centring q would only remove one direction of the query space. The learned scale
      # starts at 1 and sets how sharp attention can get. The softmax scale stays the standard
      # 1/sqrt(D): for unit-RMS q and k in random directions, q.k / sqrt(D) has unit variance.
      q, k = RMSNorm(name='q_norm')(q), RMSNorm(name='k_norm')(k)
    if cfg.position == 'rotary' and 'positions' not in cfg.ablated:
      # Absolute positions pos .. pos + T - 1; the cache stores keys already rotated. Re-encoding a
      # window from position 0 (gpt_jax/sampling.py) changes no score, as only differences count.
      positions = pos + jnp.arange(T)
      q, k = rotary(q, positions, cfg.rope_base), rotary(k, positions, cfg.rope_base)

    use_dropout = not deterministic and cfg.dropout > 0.0
    drop_probs = use_dropout and cfg.attention_dropout  # Dropout on the attention probabilities.
    prefill = cache is not None and isinstance(pos, int) and pos == 0  # Nothing cached to read yet.
    impl = attention_implementation(cfg, drop_probs)
    if 'attention' in cfg.ablated:
      # Ablation: each position attends only to itself (a softmax over one score is 1), so y = v.
      y = causal_attention(q, k, v, jnp.eye(T, dtype=bool), cfg.dropout,
                           self.make_rng('dropout') if drop_probs else None,
                           probs_hook=(lambda p: self.sow('intermediates', 'attn_probs', p))
                           if self.record_probs else None)
    elif cache is not None and not prefill:
      # Generation: the new tokens attend over the cache's past and, causally, over each other.
      y = cached_attention(q, k, v, cache['k'], cache['v'], pos)
    elif impl in ('xla', 'cudnn') and not self.record_probs:
      # jax.nn.dot_product_attention with the implementation named explicitly (its default, None,
      # is XLA in every JAX so far). It takes and returns (B, T, H, D).
      q_, k_, v_ = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
      y = jax.nn.dot_product_attention(q_, k_, v_, is_causal=True, implementation=impl)
      y = y.transpose(0, 2, 1, 3)  # (B, H, T, D)
    elif T > QUERY_BLOCK and not self.record_probs:
      # Training / full forward of a long sequence: skip the fully masked blocks.
      y = block_causal_attention(q, k, v, QUERY_BLOCK, cfg.dropout,
                                 self.make_rng('dropout') if drop_probs else None)
    else:
      y = causal_attention(q, k, v, jnp.tril(jnp.ones((T, T), bool)), cfg.dropout,
                           self.make_rng('dropout') if drop_probs else None,
                           probs_hook=(lambda p: self.sow('intermediates', 'attn_probs', p))
                           if self.record_probs else None)
    if cache is not None:
      # Write this chunk's keys/values at [pos, pos + T), made to depend on the attention output
      # (_after) so that XLA sees every read of the cache come first and updates it in place.
      write = lambda c, new: jax.lax.dynamic_update_slice(c, _after(new, y).astype(c.dtype),
                                                            (0, 0, pos, 0))
      cache = {'k': write(cache['k'], k), 'v': write(cache['v'], v)}
    y = y.transpose(0, 2, 1, 3)  # (B, T, H, D)
    y = y.reshape(B, T, C)
    y = Linear(C, cfg.bias, std=resid_std, dtype=dtype, name='c_proj')(y)
    y = Dropout(cfg.dropout)(y, deterministic=deterministic)  # Residual dropout.
    return y, cache


class MLP(nn.Module):
  """Position-wise feed-forward: Linear(C -> 4C), GELU (or ReLU^2), Linear(4C -> C), dropout."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    h = Linear(4 * cfg.n_embd, cfg.bias, dtype=dtype, name='c_fc')(x)  # (B, T, 4C)
    h = relu2(h) if cfg.activation == 'relu2' else gelu(h, approximate=cfg.gelu_approximate)
    resid_std = 0.0 if cfg.zero_init_proj else 0.02 / math.sqrt(2 * cfg.n_layer)
    h = Linear(cfg.n_embd, cfg.bias, std=resid_std, dtype=dtype, name='c_proj')(h)
    return Dropout(cfg.dropout)(h, deterministic=deterministic)


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""
  config: ModelConfig
  record_probs: bool = False  # See CausalSelfAttention.

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool, cache: Optional[dict[str, jax.Array]] = None,
               pos: Any = 0) -> tuple[jax.Array, Optional[dict[str, jax.Array]]]:
    cfg, off = self.config, self.config.ablated
    ln = lambda name: (lambda x: x) if 'layernorm' in off else LayerNorm(cfg.bias, name=name)
    a, cache = CausalSelfAttention(cfg, self.record_probs, name='attn')(ln('ln_1')(x), deterministic,
                                                                        cache, pos)
    # The residual stream carries everything; each sub-layer adds a correction to it (unless ablated).
    x = a if 'residual' in off else x + a
    if 'mlp' not in off:
      m = MLP(cfg, name='mlp')(ln('ln_2')(x), deterministic)
      x = m if 'residual' in off else x + m
    self.sow('intermediates', 'resid', x)  # Residual stream after the block (no-op unless mutable).
    return x, cache


class GPT(nn.Module):
  """The GPT-2 language model. `apply({'params': p}, idx)` returns logits (B, T, V)."""
  config: ModelConfig
  record_probs: bool = False  # Sow every block's attention probabilities (CausalSelfAttention).

  def setup(self):
    cfg = self.config
    init = nn.initializers.normal(0.02)
    self.wte = self.param('wte', init, (cfg.vocab_size, cfg.n_embd), jnp.float32)  # Tokens.
    self.positions = cfg.position == 'learned' and 'positions' not in cfg.ablated
    if self.positions:  # Rotary models encode positions inside attention instead.
      self.wpe = self.param('wpe', init, (cfg.block_size, cfg.n_embd), jnp.float32)  # Positions.
    self.drop = Dropout(cfg.dropout)
    # remat: keep only each block's input for the backward pass and recompute the rest (activation
    # memory O(L) blocks' inputs instead of all their intermediates). `deterministic` is static.
    block = nn.remat(Block, static_argnums=(2,)) if cfg.remat else Block
    self.h = [block(cfg, self.record_probs, name=f'h_{i}') for i in range(cfg.n_layer)]
    self.ln_f = (lambda x: x) if 'layernorm' in cfg.ablated else LayerNorm(cfg.bias)

  def _forward(self, idx: jax.Array, deterministic: bool, cache: Optional[Cache],
               pos: Any) -> tuple[jax.Array, Optional[Cache]]:
    cfg = self.config
    B, T = idx.shape
    if T > cfg.block_size:
      raise ValueError(f'sequence length {T} exceeds block_size {cfg.block_size}')
    dtype = jnp.dtype(cfg.dtype)
    x = jnp.take(self.wte, idx, axis=0)  # (B, T, C)
    if self.positions:
      x = x + jnp.take(self.wpe, pos + jnp.arange(T), axis=0)
    # The residual stream stays float32 whatever the compute dtype (as under torch.autocast): each
    # Linear casts its input to `dtype` and its bf16 output is added back in float32.
    x = self.drop(x, deterministic=deterministic)
    self.sow('intermediates', 'embed', x)  # Residual stream entering h_0 (no-op unless mutable).
    new_cache = []
    for i, block in enumerate(self.h):
      x, layer_cache = block(x, deterministic, None if cache is None else cache[i], pos)
      new_cache.append(layer_cache)
    x = self.ln_f(x)
    # Weight tying: the output layer is the token embedding, transposed (saves V*C parameters).
    logits = jnp.dot(x.reshape(B * T, -1).astype(dtype), self.wte.astype(dtype).T,
                     preferred_element_type=dtype).reshape(B, T, cfg.vocab_size)  # (See Linear.)
    return logits.astype(jnp.float32), (None if cache is None else tuple(new_cache))

  def __call__(self, idx: jax.Array, deterministic: bool = True) -> jax.Array:
    """idx (B, T) int token ids -> logits (B, T, V) float32. Dropout is off unless told otherwise."""
    return self._forward(idx, deterministic, None, 0)[0]

  def decode(self, idx: jax.Array, cache: Cache, pos: Any) -> tuple[jax.Array, Cache]:
    """Runs tokens at absolute positions [pos, pos + T) against a KV cache (inference only).

    Used both to prefill a prompt (T > 1, pos = 0) and to extend by one token (T = 1).
    Returns logits (B, T, V) and the updated cache.
    """
    return self._forward(idx, True, cache, pos)


def init_cache(config: ModelConfig, batch_size: int) -> Cache:
  """An empty KV cache covering the whole context window: per layer k, v of (B, H, S, D)."""
  shape = (batch_size, config.heads, config.block_size, config.head_size)
  dtype = jnp.dtype(config.dtype)
  return tuple({'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
               for _ in range(config.n_layer))


def init_params(config: ModelConfig, key: jax.Array) -> Any:
  """Fresh GPT-2-initialised parameters."""
  dummy = jnp.zeros((1, min(8, config.block_size)), jnp.int32)
  return GPT(config).init(key, dummy)['params']


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
