"""Every departure from GPT-2 the model can make, each one named piece; all off by default.

gpt_jax/model.py is GPT-2 and reaches each piece here by one line, which is the identity (or GPT-2's
choice) unless the option is set, so a reader of GPT-2 can skip this file. Two kinds:

Speedrun options (modded-nanogpt's levers; ModelConfig.position, qk_norm, activation, zero_init_proj):
  * position='rotary': no `wpe`; q and k of every head are rotated by their position (RoPE), so
    attention scores depend only on the distance between query and key;
  * qk_norm: q and k are RMS-normalised per head (`attn.q_norm`, `attn.k_norm`, each a learned
    head-size scale) before the dot product;
  * activation='relu2': the MLP uses relu(x)^2 instead of GELU;
  * zero_init_proj: `attn.c_proj` and `mlp.c_proj` kernels start at zero, so every block starts as
    the identity on the residual stream.

Ablations (ModelConfig.ablate), which take a piece out of GPT-2 to show what it is for:
  attention (each position attends only to itself), positions (no position information), residual
  (no residual connections), layernorm (ln_1, ln_2, ln_f are the identity), heads (one head of size
  n_embd: ModelConfig.heads), mlp (no MLP sub-layer). What remains keeps GPT-2's parameter names.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax import attention as attention_lib
from gpt_jax.config import ModelConfig

Attend = Callable[..., tuple[jax.Array, Any]]  # The signature of gpt_jax.attention.attend.


# --- speedrun options ---------------------------------------------------------------------------------

class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale over the last axis, in float32; no centring, no bias."""
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (y * scale).astype(x.dtype)


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


def queries_and_keys(cfg: ModelConfig, q: jax.Array, k: jax.Array, pos: Any) -> tuple[jax.Array, jax.Array]:
  """q, k (B, H, T, D) as attention compares them: GPT-2's unchanged, or QK-normed and/or rotated.

  Called inside CausalSelfAttention, so QK-norm's scales are its `q_norm` and `k_norm`.
  """
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
    positions = pos + jnp.arange(q.shape[2])
    q, k = rotary(q, positions, cfg.rope_base), rotary(k, positions, cfg.rope_base)
  return q, k


def relu2(x: jax.Array) -> jax.Array:
  """ReLU squared, relu(x)^2 (Primer; modded-nanogpt's MLP): sparse like ReLU, smooth at 0."""
  return jnp.square(jnp.maximum(x, 0))


def projection_std(cfg: ModelConfig, gpt2_std: float) -> float:
  """The init std of attn.c_proj and mlp.c_proj: GPT-2's, or 0 with zero_init_proj."""
  return 0.0 if cfg.zero_init_proj else gpt2_std


# --- ablations ----------------------------------------------------------------------------------------

def learned_positions(cfg: ModelConfig) -> bool:
  """Whether the model has GPT-2's position table `wpe` (not with rotary positions, nor ablated)."""
  return cfg.position == 'learned' and 'positions' not in cfg.ablated


def attend_to_self(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, cache: Any = None,
                   pos: Any = 0, dropout_rng: Any = None, probs_hook: Any = None) -> tuple[jax.Array, Any]:
  """The 'attention' ablation, as `attention.attend`: each position attends only to itself.

  A softmax over one score is 1, so y = v (c_attn's q and k are computed but get no gradient).
  """
  T = q.shape[2]
  y = attention_lib.causal_attention(q, k, v, jnp.eye(T, dtype=bool), cfg.dropout, dropout_rng,
                                     probs_hook=probs_hook)
  if cache is not None:
    cache = attention_lib.write_cache(cache, k, v, y, pos)
  return y, cache


def attention(cfg: ModelConfig, gpt2_attend: Attend) -> Attend:
  """GPT-2's attention (`gpt2_attend`), or with the 'attention' ablation `attend_to_self`."""
  return attend_to_self if 'attention' in cfg.ablated else gpt2_attend


class Identity(nn.Module):
  """What the 'layernorm' ablation puts in a LayerNorm's place: y = x, no parameters."""
  use_bias: bool = True  # Taken (as LayerNorm's) and ignored.

  def __call__(self, x: jax.Array) -> jax.Array:
    return x


def norm(cfg: ModelConfig, gpt2_norm: type[nn.Module]) -> type[nn.Module]:
  """The module class of ln_1, ln_2 and ln_f: GPT-2's LayerNorm, or the identity when ablated."""
  return Identity if 'layernorm' in cfg.ablated else gpt2_norm


def residual(cfg: ModelConfig, x: jax.Array, y: jax.Array) -> jax.Array:
  """A sub-layer's output y joining the residual stream x: x + y (GPT-2), or y alone when ablated."""
  return y if 'residual' in cfg.ablated else x + y


def has_mlp(cfg: ModelConfig) -> bool:
  """Whether each block has its MLP sub-layer (ln_2 and mlp): not with the 'mlp' ablation."""
  return 'mlp' not in cfg.ablated
