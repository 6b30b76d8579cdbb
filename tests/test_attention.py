"""The two attention backends: model.attention='xla' (jax.nn.dot_product_attention) vs 'manual'.

Both must compute the same function: equal logits and equal gradients wrt every parameter, in the
full forward pass and in the KV-cache decode path used for generation; also with every speedrun
option of the model on (rotary positions, QK-norm, ReLU^2, zero-initialised projections).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
import pytest

from gpt_jax import model as model_lib
from gpt_jax.config import ModelConfig
from gpt_jax.model import GPT

BASE = ModelConfig(vocab_size=41, block_size=24, n_layer=2, n_head=4, n_embd=32, dropout=0.0,
                   attention='manual')
ATOL = 2e-5  # float32: logits are O(1); differences come from summation order only.
ALL_OPTIONS = dict(position='rotary', qk_norm=True, activation='relu2', zero_init_proj=True)
# (bias, model options): nanoGPT's model, GPT-2's, and the speedrun options all together.
VARIANTS = pytest.mark.parametrize('bias, options', [(False, {}), (True, {}), (True, ALL_OPTIONS)],
                                   ids=['no_bias', 'bias', 'bias_all_options'])


def _params(cfg: ModelConfig):
  """GPT-2 init plus noise on every tensor, so biases and LayerNorm parameters are not trivial."""
  params = jax.jit(model_lib.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def _pair(bias: bool, options: dict):
  manual = dataclasses.replace(BASE, bias=bias, attention='manual', **options)
  return manual, dataclasses.replace(manual, attention='xla'), _params(manual)


@functools.partial(jax.jit, static_argnums=1)
def _forward(params, cfg, x):
  return GPT(cfg).apply({'params': params}, x)


@functools.partial(jax.jit, static_argnums=1)
def _decode(params, cfg, tokens, cache, pos):
  """One KV-cache call with a traced position, as in sample.generate."""
  return GPT(cfg).apply({'params': params}, tokens, cache, pos, method=GPT.decode)


def _loss(params, cfg, x, y):
  logits = GPT(cfg).apply({'params': params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


_value_and_grad = jax.jit(jax.value_and_grad(_loss), static_argnums=1)


def _tokens(shape, seed=2):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, BASE.vocab_size)


@pytest.mark.slow
@VARIANTS
def test_same_logits(bias, options):
  manual, xla, params = _pair(bias, options)
  x = _tokens((3, BASE.block_size))
  a = _forward(params, manual, x)
  b = _forward(params, xla, x)
  diff = float(jnp.max(jnp.abs(a - b)))
  print(f'bias={bias}: max |logits xla - manual| = {diff:.2e}')
  assert diff < ATOL


@pytest.mark.slow
@VARIANTS
def test_same_gradients_wrt_every_parameter(bias, options):
  manual, xla, params = _pair(bias, options)
  x = _tokens((2, BASE.block_size + 1), seed=3)
  x, y = x[:, :-1], x[:, 1:]
  la, ga = _value_and_grad(params, manual, x, y)
  lb, gb = _value_and_grad(params, xla, x, y)
  assert float(abs(la - lb)) < 1e-6
  worst = 0.0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ga), jax.tree_util.tree_leaves(gb)):
    scale = float(jnp.max(jnp.abs(a)))
    assert scale > 0, f'{jax.tree_util.keystr(path)} gets no gradient'
    rel = float(jnp.max(jnp.abs(a - b))) / scale
    worst = max(worst, rel)
    assert rel < 1e-4, f'{jax.tree_util.keystr(path)}: max |dgrad| / max |grad| = {rel:.2e}'
  print(f'bias={bias}: max over tensors of max |dgrad| / max |grad| = {worst:.2e}')


@pytest.mark.slow
@VARIANTS
def test_same_logits_through_the_kv_cache(bias, options):
  """Prefill a prompt, then decode one token at a time (traced positions, as in generation).

  The prefill runs the selected backend's kernel; every later step runs attention.cached_attention.
  Both configs must agree with each other and with the full forward pass.
  """
  manual, xla, params = _pair(bias, options)
  B, P, T = 2, 5, BASE.block_size
  x = _tokens((B, T), seed=4)
  full = _forward(params, manual, x)
  decoded = {}
  for cfg in (manual, xla):
    logits, cache = _decode(params, cfg, x[:, :P], model_lib.init_cache(cfg, B), 0)
    steps = [logits]
    for t in range(P, T):
      logits, cache = _decode(params, cfg, x[:, t:t + 1], cache, jnp.asarray(t, jnp.int32))
      steps.append(logits)
    decoded[cfg.attention] = jnp.concatenate(steps, axis=1)  # (B, T, V)
    diff = float(jnp.max(jnp.abs(decoded[cfg.attention] - full)))
    print(f'bias={bias} {cfg.attention}: max |decode - full forward (manual)| = {diff:.2e}')
    assert diff < ATOL
  diff = float(jnp.max(jnp.abs(decoded['xla'] - decoded['manual'])))
  print(f'bias={bias}: max |decode xla - decode manual| = {diff:.2e}')
  assert diff < ATOL
