"""Gradient check: autodiff gradients of the training loss vs central finite differences, in float64.

float64 is needed because a central difference (L(p + h) - L(p - h)) / 2h loses ~eps_mach * L / h
to rounding: in float32 that is ~1e-2 relative, in float64 ~1e-10, so a 1e-6 check means something.

How the model runs in float64. gpt_jax.model works in `cfg.dtype` and keeps its statistics
(LayerNorm mean/variance, attention scores, logits) in `jnp.float32`; ModelConfig allows only
float32/bfloat16/float16. Rather than replace any model code, the test swaps the `jnp` name *inside
gpt_jax.model, gpt_jax.attention and gpt_jax.model_variants* for jax.numpy with float32 meaning float64 (`_Float64Numpy`), so every line of the
model runs as written, with its working precision raised to float64. The test asserts that logits
and gradients really are float64, and the patch and x64 mode are undone afterwards.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from gpt_jax import attention as attention_lib, model as model_lib, model_variants as variants
from gpt_jax.config import ModelConfig
from gpt_jax.model import GPT
from gpt_jax.training.step import loss_fn

CFG = ModelConfig(vocab_size=23, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0,
                  bias=True)
H = 1e-5            # Finite-difference step: truncation ~H^2 * L''' and rounding ~1e-16 / H.
PER_TENSOR = 3      # Parameter entries checked in each tensor (every tensor is covered).


class _Float64Numpy:
  """jax.numpy, except that the name float32 (and dtype('float32')) means float64."""
  float32 = jnp.float64

  @staticmethod
  def dtype(d):
    d = jnp.dtype(d)
    return jnp.dtype(jnp.float64) if d == jnp.float32 else d

  def __getattr__(self, name):
    return getattr(jnp, name)


@pytest.fixture
def float64_model(monkeypatch):
  """x64 mode on and gpt_jax.model computing in float64, both restored after the test."""
  before = jax.config.jax_enable_x64
  with jax.enable_x64(True):
    for module in (model_lib, attention_lib, variants):  # The model and the code it calls.
      monkeypatch.setattr(module, 'jnp', _Float64Numpy())
    yield
    monkeypatch.undo()
  assert jax.config.jax_enable_x64 == before


def _relative_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.abs(a - b) / np.maximum(np.abs(a), np.abs(b))


@pytest.mark.slow
@pytest.mark.parametrize('gelu_approximate', [False, True])
def test_gradients_match_central_differences(float64_model, gelu_approximate):
  cfg = dataclasses.replace(CFG, gelu_approximate=gelu_approximate)
  model = GPT(cfg)
  params = jax.jit(model_lib.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))
  # Noise on every tensor so biases / LayerNorm terms are not at their special initial values and
  # the gradients are well away from zero.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree_util.tree_unflatten(
      tree, [p + 0.1 * jax.random.normal(k, p.shape, jnp.float64) for p, k in zip(leaves, keys)])
  tokens = jax.random.randint(jax.random.PRNGKey(2), (3, cfg.block_size + 1), 0, cfg.vocab_size)
  x, y = tokens[:, :-1], tokens[:, 1:]

  assert jax.eval_shape(model.apply, {'params': params}, x).dtype == jnp.float64  # Really float64.
  grads = jax.jit(jax.grad(loss_fn), static_argnums=1)(params, model, x, y, None)
  assert all(g.dtype == jnp.float64 for g in jax.tree_util.tree_leaves(grads))

  flat, unravel = ravel_pytree(params)
  flat_grad = np.asarray(ravel_pytree(grads)[0])
  loss_at = jax.jit(lambda v: loss_fn(unravel(v), model, x, y, None))

  # A random sample of entries, PER_TENSOR from each tensor, among entries whose gradient is not
  # tiny (a relative error of a ~0 gradient measures only the finite-difference noise; e.g. the key
  # part of c_attn.bias has an exactly-zero true gradient, softmax being shift-invariant).
  rng = np.random.default_rng(0)
  picks, offset = [], 0
  for leaf in jax.tree_util.tree_leaves(params):
    g = np.abs(flat_grad[offset:offset + leaf.size])
    candidates = np.flatnonzero(g > 1e-3 * g.max())
    picks += list(offset + rng.choice(candidates, min(PER_TENSOR, len(candidates)), replace=False))
    offset += leaf.size

  errors = []
  for i in picks:
    e = jnp.zeros_like(flat).at[i].set(H)
    fd = (float(loss_at(flat + e)) - float(loss_at(flat - e))) / (2 * H)
    errors.append(_relative_error(np.array(fd), np.array(flat_grad[i])))
  errors = np.array(errors)
  print(f'gelu_approximate={gelu_approximate}: {len(picks)} entries, max relative error '
        f'{errors.max():.2e} (median {np.median(errors):.2e})')
  assert len(picks) >= PER_TENSOR * len(leaves) - 3
  assert errors.max() < 1e-6


def test_x64_is_off_again():
  """The fixture leaves the rest of the suite in float32."""
  assert not jax.config.jax_enable_x64
  assert model_lib.jnp is attention_lib.jnp is variants.jnp is jnp
  params = jax.eval_shape(lambda: model_lib.init_params(CFG, jax.random.PRNGKey(0)))
  assert jax.eval_shape(GPT(CFG).apply, {'params': params}, jnp.zeros((1, 4), jnp.int32)
                        ).dtype == jnp.float32
