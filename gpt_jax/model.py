"""GPT-2 in Flax Linen, written out by hand in one file, as nanoGPT's model.py.

Read it top to bottom: LayerNorm and Linear (the two parameterised building blocks), GELU and
dropout, causal self-attention, the MLP, a pre-LN transformer block, and the GPT that stacks them.
Parameter names follow GPT-2 / nanoGPT so weights map one-to-one: `wte`, `wpe`, `h_0 ... h_{L-1}`
each with `ln_1`, `attn.c_attn`, `attn.c_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`, and the final `ln_f`.

Shapes: B = batch, T = sequence length, C = n_embd, H = n_head, D = head size (C // H),
S = cache length (= block_size), V = vocab size.

Where Flax's defaults differ, GPT-2's are followed: weights N(0, 0.02), residual projections
N(0, 0.02 / sqrt(2 L)), biases zero (Flax's Dense: lecun_normal); LayerNorm eps 1e-5 (Flax: 1e-6);
GELU exact (erf) as in nanoGPT, or GPT-2's tanh form (`gelu_approximate`).

How the attention softmax is computed (written out, blockwise, over a KV cache, fused) is
gpt_jax/attention.py. The departures from GPT-2 (rotary, QK-norm, ReLU^2, zero-init, the ablations)
are one line each into gpt_jax/model_variants.py, which a reader can skip: off, each is the identity.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt_jax import attention, model_variants as variants
from gpt_jax.config import ModelConfig

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

  `approximate`: GPT-2's tanh form, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). (jax.nn.gelu's
  exact form goes through erfc, slower on a CPU for the same values.)"""
  if approximate:
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
  return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Zeroes each element with probability `rate` and scales the survivors by 1 / (1 - rate).

  Keep/drop compares 16 random bits with round(rate * 2^16), so two elements share one 32-bit draw:
  half the random numbers of `jax.random.bernoulli`, whose generator is most of dropout's cost on a
  CPU. The rate is a multiple of 2^-16, and survivors are scaled by the exact inverse of the keep
  probability used, so E[dropout(x)] = x."""
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


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention with an optional KV cache for generation. `record_probs` sows the
  attention probabilities ('intermediates'/'attn_probs'; the written-out (T, T) kernel only), for the
  per-layer statistics (training/layer_stats.py): it changes the kernel, never the function."""
  config: ModelConfig
  record_probs: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool, cache: Optional[dict[str, jax.Array]] = None,
               pos: Any = 0) -> tuple[jax.Array, Optional[dict[str, jax.Array]]]:
    cfg = self.config
    B, T, C = x.shape
    H, D = cfg.heads, cfg.head_size  # n_head heads (one with the 'heads' ablation) of C // H each.
    dtype = jnp.dtype(cfg.dtype)
    # GPT-2: scale residual projections by 1/sqrt(N), N = 2L of them adding to the residual stream.
    resid_std = variants.projection_std(cfg, 0.02 / math.sqrt(2 * cfg.n_layer))

    qkv = Linear(3 * C, cfg.bias, dtype=dtype, name='c_attn')(x)  # (B, T, 3C)
    # One transpose puts q, k, v head-major: (B, T, 3, H, D) -> (3, B, H, T, D).
    q, k, v = qkv.reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)  # Each (B, H, T, D).
    q, k = variants.queries_and_keys(cfg, q, k, pos)  # GPT-2: unchanged (QK-norm, rotary).
    # softmax(q k^T / sqrt(D) + causal mask) v, with dropout on the probabilities when training.
    drop_probs = not deterministic and cfg.dropout > 0.0 and cfg.attention_dropout
    hook = (lambda p: self.sow('intermediates', 'attn_probs', p)) if self.record_probs else None
    y, cache = variants.attention(cfg, attention.attend)(
        cfg, q, k, v, cache, pos, self.make_rng('dropout') if drop_probs else None, hook)
    y = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # Heads side by side again: (B, T, H * D).
    y = Linear(C, cfg.bias, std=resid_std, dtype=dtype, name='c_proj')(y)
    y = Dropout(cfg.dropout)(y, deterministic=deterministic)  # Residual dropout.
    return y, cache


class MLP(nn.Module):
  """Position-wise feed-forward: Linear(C -> 4C), GELU, Linear(4C -> C), dropout."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    h = Linear(4 * cfg.n_embd, cfg.bias, dtype=dtype, name='c_fc')(x)  # (B, T, 4C)
    h = gelu(h, cfg.gelu_approximate) if cfg.activation == 'gelu' else variants.relu2(h)
    resid_std = variants.projection_std(cfg, 0.02 / math.sqrt(2 * cfg.n_layer))
    h = Linear(cfg.n_embd, cfg.bias, std=resid_std, dtype=dtype, name='c_proj')(h)
    return Dropout(cfg.dropout)(h, deterministic=deterministic)


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""
  config: ModelConfig
  record_probs: bool = False  # See CausalSelfAttention.

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool, cache: Optional[dict[str, jax.Array]] = None,
               pos: Any = 0) -> tuple[jax.Array, Optional[dict[str, jax.Array]]]:
    cfg = self.config
    Norm = variants.norm(cfg, LayerNorm)  # LayerNorm (the identity with the 'layernorm' ablation).
    a, cache = CausalSelfAttention(cfg, self.record_probs, name='attn')(
        Norm(cfg.bias, name='ln_1')(x), deterministic, cache, pos)
    # The residual stream carries everything; each sub-layer adds a correction to it: x + a.
    x = variants.residual(cfg, x, a)
    if variants.has_mlp(cfg):
      x = variants.residual(cfg, x, MLP(cfg, name='mlp')(Norm(cfg.bias, name='ln_2')(x), deterministic))
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
    if variants.learned_positions(cfg):  # GPT-2 (not rotary positions, nor the 'positions' ablation).
      self.wpe = self.param('wpe', init, (cfg.block_size, cfg.n_embd), jnp.float32)  # Positions.
    self.drop = Dropout(cfg.dropout)
    # remat: keep only each block's input for the backward pass and recompute the rest (activation
    # memory O(L) blocks' inputs instead of all their intermediates). `deterministic` is static.
    block = nn.remat(Block, static_argnums=(2,)) if cfg.remat else Block
    self.h = [block(cfg, self.record_probs, name=f'h_{i}') for i in range(cfg.n_layer)]
    self.ln_f = variants.norm(cfg, LayerNorm)(cfg.bias)

  def _forward(self, idx: jax.Array, deterministic: bool, cache: Optional[Cache],
               pos: Any) -> tuple[jax.Array, Optional[Cache]]:
    cfg = self.config
    B, T = idx.shape
    if T > cfg.block_size:
      raise ValueError(f'sequence length {T} exceeds block_size {cfg.block_size}')
    dtype = jnp.dtype(cfg.dtype)
    x = jnp.take(self.wte, idx, axis=0)  # (B, T, C)
    if variants.learned_positions(cfg):
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
    """Runs tokens at absolute positions [pos, pos + T) against a KV cache (inference only): a prompt's
    prefill (T > 1, pos = 0) or one more token (T = 1). Returns logits (B, T, V) and the new cache."""
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
