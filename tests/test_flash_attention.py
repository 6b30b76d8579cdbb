"""The Pallas flash-attention kernel (gpt_jax/flash_attention.py), run on the CPU in interpret mode.

It must compute the written-out softmax (attention.causal_attention) with the same hashed dropout
mask: forward, dq, dk, dv; mask for mask; with sequences that are not a whole number of blocks.
The hash itself must keep ~1 - rate of the probabilities, independently across heads, rows and
positions, and be a function of its seed. Then the model: model.attention='flash' equals the
written-out softmax with that mask, in training and evals. Tiny shapes: every call compiles.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt_jax import attention as attention_lib, flash_attention as flash
from gpt_jax.config import ModelConfig
from gpt_jax.errors import UserError
from gpt_jax.model import GPT

B, H, D = 2, 2, 16
SEED = jnp.uint32(20240601)


def _qkv(T, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q, k, v, w = (jax.random.normal(key, (B, H, T, D)) for key in keys)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), w  # w: a random output cotangent.


# Jitted: run eagerly, each of its operations would compile on its own.
_mask = jax.jit(flash.hashed_dropout_mask, static_argnums=(1, 2, 3, 4))


def _written_out(q, k, v, seed, rate):
  T = q.shape[2]
  return attention_lib.causal_attention(q, k, v, jnp.tril(jnp.ones((T, T), bool)), rate,
                                        dropout_seed=seed)


def _value_and_grads(attend, q, k, v, w):
  """attend(q, k, v) and the gradients of sum(attend(q, k, v) * w) wrt q, k, v: one program."""
  def run(q, k, v, w):
    y, pullback = jax.vjp(attend, q, k, v)
    return y, pullback(w.astype(y.dtype))
  return jax.jit(run)(q, k, v, w)


@pytest.mark.parametrize('T, block_q, block_k, rate, dtype, tol', [
    (64, 16, 16, 0.0, jnp.float32, 1e-5),   # No dropout (no seed): as the model's causal_attention.
    (48, 32, 16, 0.2, jnp.float32, 1e-5),   # Padded to 64; query and key blocks of different sizes.
    (64, 16, 16, 0.2, jnp.bfloat16, 3e-2),  # bf16 inputs: bf16 products either way, rounded apart.
], ids=['f32', 'f32_dropout_padded', 'bf16_dropout'])
def test_kernel_equals_the_written_out_softmax(T, block_q, block_k, rate, dtype, tol):
  q, k, v, w = _qkv(T, dtype)
  seed = SEED if rate else None
  kernel = lambda q, k, v: flash.flash_attention(q, k, v, seed, rate, block_q=block_q,
                                                 block_k=block_k, interpret=True)
  (y, grads), (y_ref, grads_ref) = (_value_and_grads(f, q, k, v, w) for f in (
      kernel, lambda q, k, v: _written_out(q, k, v, SEED, rate)))
  assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
  scale = lambda a: max(1.0, float(jnp.max(jnp.abs(a.astype(jnp.float32)))))
  for name, a, b in zip(('y', 'dq', 'dk', 'dv'), (y, *grads), (y_ref, *grads_ref)):
    err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
    assert err <= tol * scale(b), f'{name}: max |kernel - written out| = {err:.2e}'


def test_mask_for_mask_and_seed():
  """With v the identity, the output *is* the dropped probability matrix (o[t, s] = Pd[t, s]), and
  with output cotangent the identity so is dv (dv[s, t] = Pd[t, s]): the forward and the dk/dv
  kernel each zero exactly the probabilities the hashed mask drops. Same seed, same output; another
  seed, another mask."""
  T, rate = 32, 0.3
  q, k, _, _ = _qkv(T)
  q, k = 0.5 * q, 0.5 * k  # Probabilities near 1 / (t + 1): none underflows to 0.
  eye = jnp.broadcast_to(jnp.eye(T, 2 * D), (B, H, T, 2 * D))  # T <= head size 32.
  q, k = (jnp.concatenate([a, a], axis=-1) for a in (q, k))

  @jax.jit
  def run(seed):
    kernel = lambda q, k, v: flash.flash_attention(q, k, v, seed, rate, block_q=16, block_k=16,
                                                   interpret=True)
    y, pullback = jax.vjp(kernel, q, k, eye)
    return y, pullback(eye)[2]

  y, dv = run(SEED)
  probs = jnp.tril(jnp.ones((T, T), bool))
  want = _mask(SEED, rate, B, H, T) & probs  # (B, H, T, T)
  np.testing.assert_array_equal(np.asarray(y[..., :T] != 0), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(dv[..., :T] != 0), np.asarray(want.swapaxes(-1, -2)))
  assert 0.5 < float(want.sum() / probs.sum() / (B * H)) < 0.9  # About 1 - rate are kept.
  again, _ = run(SEED)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(y))
  other, _ = run(SEED + 1)
  assert not np.array_equal(np.asarray(other != 0), np.asarray(y != 0))
  np.testing.assert_array_equal(np.asarray(other[..., :T] != 0),
                                np.asarray(_mask(SEED + 1, rate, B, H, T) & probs))


def test_hash_keeps_one_minus_rate_independently():
  """Keep fractions over 2 x 4 x 128 x 128 draws, and of pairs of draws in neighbouring heads, batch
  rows, query and key positions (and both of a pair swapped): (1 - r) and (1 - r)^2, each within
  ~6 standard deviations, where a mixing flaw (a weak hash) shows up as a far larger bias."""
  rate, n_b, n_h, T = 0.2, 2, 4, 128
  keep = np.asarray(_mask(SEED, rate, n_b, n_h, T), np.float64)
  p = 1 - rate
  assert abs(keep.mean() - p) < 6 * np.sqrt(p * rate / keep.size)
  pairs = {'heads': (keep[:, 1:], keep[:, :-1]), 'batch rows': (keep[1:], keep[:-1]),
           'queries': (keep[..., 1:, :], keep[..., :-1, :]), 'keys': (keep[..., 1:], keep[..., :-1]),
           'diagonal': (keep[..., 1:, 1:], keep[..., :-1, :-1]),
           'transposed': (keep, keep.swapaxes(-1, -2))}
  for name, (a, b) in pairs.items():
    both = (a * b).mean()
    assert abs(both - p * p) < 6 * np.sqrt(p * p * (1 - p * p) / a.size), (name, both, p * p)
  # Every query row keeps ~1 - rate of its keys (no row is stuck), and other seeds give other masks.
  rows = keep.mean(axis=-1)
  assert rows.min() > p - 7 * np.sqrt(p * rate / T) and rows.max() < p + 7 * np.sqrt(p * rate / T)
  other = np.asarray(_mask(SEED + 1, rate, n_b, n_h, T), np.float64)
  assert abs((keep != other).mean() - 2 * p * rate) < 0.01
  np.testing.assert_array_equal(np.asarray(_mask(SEED, rate, n_b, n_h, T)),
                                keep.astype(bool))
  assert bool(_mask(SEED, 0.0, 1, 1, 8).all())


def test_kernel_refuses_what_it_cannot_do():
  q = jnp.zeros((1, 1, 16, D))
  with pytest.raises(ValueError, match='needs a seed'):
    flash.flash_attention(q, q, q, None, 0.1, interpret=True)
  long = jax.ShapeDtypeStruct((1, 1, flash.MAX_POSITIONS + 1, D), jnp.float32)
  with pytest.raises(ValueError, match='dropout hash counts at most'):
    jax.eval_shape(lambda q: flash.flash_attention(q, q, q, interpret=True), long)
  assert flash.block_size_for(24) == 32 and flash.block_size_for(5) == 16
  assert flash.block_size_for(256) == flash.BLOCK


# --- the model -----------------------------------------------------------------------------------

CFG = ModelConfig(vocab_size=29, block_size=24, n_layer=1, n_head=2, n_embd=32, dropout=0.2,
                  attention='flash')  # Head size 16; T = 24 is padded to two blocks of 16.


@pytest.mark.slow  # About 6 s of CPU: compiles a model step twice, one with the interpreted kernels.
def test_model_flash_equals_written_out_softmax_with_the_hashed_mask():
  """A training forward and gradient with attention='flash' equal those of the same model asked for
  its attention probabilities, which computes the written-out softmax with the same hashed mask
  (and the same seeds, drawn from each layer's dropout key)."""
  x = jax.random.randint(jax.random.PRNGKey(1), (2, CFG.block_size), 0, CFG.vocab_size)
  y = jnp.roll(x, -1, axis=1)
  params = GPT(dataclasses.replace(CFG, attention='manual')).init(jax.random.PRNGKey(0), x)['params']

  @jax.jit
  def run(params):
    def loss(p, record_probs):
      logits = GPT(CFG, record_probs=record_probs).apply(
          {'params': p}, x, deterministic=False, rngs={'dropout': jax.random.PRNGKey(7)},
          mutable='intermediates')[0]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return [jax.value_and_grad(loss)(params, r) for r in (False, True)]

  (la, ga), (lb, gb) = run(params)
  assert abs(float(la - lb)) < 1e-5
  for a, b in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(b))))


def test_flash_says_why_it_cannot_run():
  with pytest.raises(UserError, match=r"model.attention='flash'.*head size .* \(got 12\)"):
    attention_lib.attention_implementation(dataclasses.replace(CFG, n_embd=24), True, 'gpu')
  too_long = dataclasses.replace(CFG, block_size=flash.MAX_POSITIONS + 1)
  with pytest.raises(UserError, match='dropout hash numbers at most 65536 positions'):
    attention_lib.attention_implementation(too_long, False, 'cpu')
  assert attention_lib.flash_problem(CFG) is None
  for dtype in ('float32', 'bfloat16', 'float16'):
    assert attention_lib.flash_problem(dataclasses.replace(CFG, dtype=dtype)) is None
  line = attention_lib.describe_attention(CFG, 'cpu')
  assert line.startswith('flash (training and evals') and 'interpret mode on cpu' in line
  assert 'interpret' not in attention_lib.describe_attention(CFG, 'gpu')
