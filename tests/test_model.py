"""The hand-written GPT-2: shapes, causality, parameter count, init, LayerNorm/attention vs Flax/JAX.

Every computation here is jitted: run eagerly, each of the model's many small ops is compiled on its
own, which on a CPU costs seconds per test for models this size. The values are the same.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import attention as attention_lib, model as model_lib
from gpt_jax.config import ModelConfig, num_params
from gpt_jax.errors import UserError
from gpt_jax.model import GPT

CFG = ModelConfig(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0)


@functools.lru_cache(maxsize=None)
def _params(cfg=CFG, seed=0):
  """GPT-2-initialised parameters, made once per (config, seed) by one compiled program."""
  return jax.jit(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(seed)))()


@functools.lru_cache(maxsize=None)
def _forward(cfg=CFG):
  """GPT(cfg).apply, jitted once per config."""
  return jax.jit(GPT(cfg).apply)


def _tokens(shape, seed, vocab=CFG.vocab_size):
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_logits_shape_and_dtype():
  params = _params()
  idx = _tokens((3, 11), 1)
  logits = _forward()({'params': params}, idx)
  assert logits.shape == (3, 11, CFG.vocab_size)
  assert logits.dtype == jnp.float32


def test_parameter_names_follow_gpt2():
  cfg = ModelConfig(vocab_size=10, block_size=8, n_layer=2, n_head=2, n_embd=8, bias=True)
  params = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0)))  # Names: shapes do.
  flat = {'.'.join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
  for name in ['wte', 'wpe', 'h_0.ln_1.scale', 'h_0.ln_1.bias', 'h_0.attn.c_attn.kernel',
               'h_0.attn.c_proj.kernel', 'h_0.ln_2.scale', 'h_0.mlp.c_fc.kernel',
               'h_1.mlp.c_proj.bias', 'ln_f.scale', 'ln_f.bias']:
    assert name in flat, name
  assert not any('lm_head' in n for n in flat)  # The head is tied to wte.


@pytest.mark.slow
def test_causality_through_gradients():
  """d logits[t] / d (input vector at position s) is exactly zero for every s > t.

  The position table row wpe[s] is added to the input at position s only, so its gradient is the
  gradient with respect to that position's input vector.
  """
  params = _params()
  model = GPT(CFG)
  T = 9
  idx = _tokens((1, T), 2)

  def summed_logits(wpe):  # (T,): one number per output position
    return model.apply({'params': dict(params, wpe=wpe)}, idx)[0].sum(-1)

  jac = jax.jit(jax.jacrev(summed_logits))(params['wpe'])  # (T, block_size, C)
  for t in range(T):
    norms = np.asarray(jnp.linalg.norm(jac[t, :T], axis=-1))
    assert np.all(norms[t + 1:] == 0.0), f'position {t} depends on the future: {norms}'
    assert np.all(norms[:t + 1] > 0), f'position {t} ignores its past: {norms}'


def test_changing_a_later_token_never_changes_earlier_logits():
  params = _params()
  idx = _tokens((2, 12), 3)
  a = _forward()({'params': params}, idx)
  idx2 = idx.copy()
  idx2[:, 7] = (idx2[:, 7] + 1) % CFG.vocab_size
  b = _forward()({'params': params}, idx2)
  np.testing.assert_array_equal(np.asarray(a[:, :7]), np.asarray(b[:, :7]))
  assert not np.allclose(np.asarray(a[:, 7:]), np.asarray(b[:, 7:]))


@pytest.mark.parametrize('cfg', [
    CFG,
    ModelConfig(vocab_size=65, block_size=64, n_layer=3, n_head=3, n_embd=48, bias=True),
    ModelConfig(vocab_size=101, block_size=32, n_layer=1, n_head=1, n_embd=16, bias=False),
])
@pytest.mark.slow
def test_parameter_count_matches_formula(cfg):
  shapes = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0)))  # Counts need no values.
  assert model_lib.count_params(shapes) == num_params(cfg)


def test_gpt2_124m_parameter_count():
  cfg = ModelConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True)
  shapes = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0)))
  assert model_lib.count_params(shapes) == num_params(cfg) == 124_439_808


def test_gpt2_initialisation():
  cfg = ModelConfig(vocab_size=500, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=True)
  p = _params(cfg)
  assert abs(float(jnp.std(p['wte'])) - 0.02) < 1e-3
  assert abs(float(jnp.std(p['h_0']['mlp']['c_fc']['kernel'])) - 0.02) < 1e-3
  resid = 0.02 / math.sqrt(2 * cfg.n_layer)
  assert abs(float(jnp.std(p['h_1']['mlp']['c_proj']['kernel'])) - resid) < 1e-3
  assert abs(float(jnp.std(p['h_1']['attn']['c_proj']['kernel'])) - resid) < 1e-3
  assert float(jnp.abs(p['h_0']['attn']['c_attn']['bias']).max()) == 0.0
  np.testing.assert_array_equal(np.asarray(p['ln_f']['scale']), 1.0)


@pytest.mark.slow
def test_initial_loss_is_close_to_uniform():
  cfg = ModelConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0)
  params = _params(cfg)
  idx, targets = _tokens((2, 8, 32), 4, vocab=65)
  logits = _forward(cfg)({'params': params}, idx)
  loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
  assert abs(float(loss) - math.log(65)) < 0.1


@pytest.mark.parametrize('use_bias', [True, False])
def test_layernorm_matches_flax(use_bias):
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((4, 7, 24)) * 3 + 1, jnp.float32)
  ours = model_lib.LayerNorm(use_bias=use_bias)
  theirs = nn.LayerNorm(epsilon=1e-5, use_bias=use_bias)
  # The init (scale 1, bias 0) plus N(0, 1) noise, so neither term is at its special value.
  p = {'params': {'scale': jnp.asarray(1 + rng.standard_normal(24), jnp.float32)}}
  if use_bias:
    p['params']['bias'] = jnp.asarray(rng.standard_normal(24), jnp.float32)
  np.testing.assert_allclose(jax.jit(ours.apply)(p, x), jax.jit(theirs.apply)(p, x), atol=1e-5, rtol=1e-5)
  # And the gradients.
  g1 = jax.jit(jax.grad(lambda p, x: (ours.apply(p, x) ** 2).sum(), argnums=(0, 1)))(p, x)
  g2 = jax.jit(jax.grad(lambda p, x: (theirs.apply(p, x) ** 2).sum(), argnums=(0, 1)))(p, x)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_attention_matches_jax_dot_product_attention():
  B, T, H, D = 2, 10, 3, 8
  q, k, v = _normal((3, B, T, H, D), 7)
  mask = jnp.tril(jnp.ones((T, T), bool))

  def ours(q, k, v):  # Takes and returns head-major (B, H, T, D).
    hm = lambda a: a.transpose(0, 2, 1, 3)
    return hm(attention_lib.causal_attention(hm(q), hm(k), hm(v), mask))

  def ref(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)

  np.testing.assert_allclose(jax.jit(ours)(q, k, v), jax.jit(ref)(q, k, v), atol=1e-5, rtol=1e-5)
  g1 = jax.jit(jax.grad(lambda *a: (ours(*a) ** 2).sum(), argnums=(0, 1, 2)))(q, k, v)
  g2 = jax.jit(jax.grad(lambda *a: (ref(*a) ** 2).sum(), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize('T, block', [(16, 4), (13, 5), (8, 8)])
def test_block_causal_attention_equals_causal_attention(T, block):
  B, H, D = 2, 3, 8
  q, k, v = _normal((3, B, H, T, D), 9)
  mask = jnp.tril(jnp.ones((T, T), bool))
  full = lambda q, k, v: attention_lib.causal_attention(q, k, v, mask)
  blocked = lambda q, k, v: attention_lib.block_causal_attention(q, k, v, block)
  np.testing.assert_allclose(jax.jit(blocked)(q, k, v), jax.jit(full)(q, k, v), atol=1e-6, rtol=1e-6)
  g1 = jax.jit(jax.grad(lambda *a: (blocked(*a) ** 2).sum(), argnums=(0, 1, 2)))(q, k, v)
  g2 = jax.jit(jax.grad(lambda *a: (full(*a) ** 2).sum(), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_model_uses_blocked_attention_for_long_sequences(monkeypatch):
  """The model's block-skipping path gives the logits and gradients of the plain path."""
  params = _params()
  idx = _tokens((2, 16), 8)

  def loss_and_grad():  # A new function each time: QUERY_BLOCK is read when it is traced.
    loss = lambda p: (GPT(CFG).apply({'params': p}, idx) ** 2).mean()
    return jax.jit(jax.value_and_grad(loss))(params)

  calls = []
  monkeypatch.setattr(attention_lib, 'block_causal_attention',
                      lambda *a, **k: calls.append(1) or _BLOCKED(*a, **k))
  monkeypatch.setattr(attention_lib, 'QUERY_BLOCK', 1000)
  plain, g_plain = loss_and_grad()
  assert not calls
  monkeypatch.setattr(attention_lib, 'QUERY_BLOCK', 4)
  blocked, g_blocked = loss_and_grad()
  assert calls
  np.testing.assert_allclose(blocked, plain, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g_blocked), jax.tree_util.tree_leaves(g_plain)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


_BLOCKED = attention_lib.block_causal_attention


def test_xla_attention_backend_matches_manual():
  params = _params()
  idx = _tokens((2, 16), 8)
  a = _forward()({'params': params}, idx)
  b = _forward(ModelConfig(**dict(CFG.to_dict(), attention='xla')))({'params': params}, idx)
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('approximate', [False, True])
def test_gelu_flag_selects_the_formula(approximate):
  x = jnp.linspace(-4, 4, 101)
  exact = 0.5 * x * (1 + jax.scipy.special.erf(x / math.sqrt(2)))
  tanh = 0.5 * x * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
  cfg = ModelConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4, dropout=0.0,
                    gelu_approximate=approximate)
  mlp = model_lib.MLP(cfg)
  # An MLP with identity-like weights exposes the activation: c_fc picks x, c_proj sums 4 copies.
  p = {'c_fc': {'kernel': jnp.eye(4, 16)}, 'c_proj': {'kernel': jnp.eye(16, 4)}}
  y = jax.jit(mlp.apply, static_argnums=2)({'params': p}, jnp.broadcast_to(x[:, None], (101, 4))[None],
                                            True)[0, :, 0]
  np.testing.assert_allclose(y, tanh if approximate else exact, atol=1e-6)
  assert not np.allclose(exact, tanh, atol=1e-6)


@pytest.mark.parametrize('approximate', [False, True])
def test_gelu_matches_jax_nn_gelu_values_and_gradients(approximate):
  x = jnp.linspace(-8, 8, 2001)
  ours = lambda x: model_lib.gelu(x, approximate)
  theirs = lambda x: jax.nn.gelu(x, approximate=approximate)
  # The erf form (PyTorch's) loses the ~1e-7-sized tail for x << 0 to cancellation in 1 + erf:
  # an absolute error below 1e-6, where jax.nn.gelu's erfc form keeps it.
  np.testing.assert_allclose(jax.jit(ours)(x), jax.jit(theirs)(x), atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.vmap(jax.grad(ours)))(x), jax.jit(jax.vmap(jax.grad(theirs)))(x),
                             atol=2e-6, rtol=1e-6)


def test_dropout_rate_scale_and_independence():
  x = jnp.ones((400, 1000))
  dropout = jax.jit(model_lib.dropout, static_argnums=1)
  y = np.asarray(dropout(x, 0.2, jax.random.PRNGKey(0)))
  kept = y != 0
  # 400k draws: the dropped fraction is 0.2 within 5 standard deviations (sd = 6.3e-4).
  assert abs(1 - kept.mean() - 0.2) < 5 * math.sqrt(0.2 * 0.8 / y.size)
  # Survivors are scaled by the inverse of the keep probability actually used (a multiple of 2^-16),
  # so the mean is preserved exactly in expectation.
  np.testing.assert_allclose(y[kept], 65536 / (65536 - round(0.2 * 65536)), rtol=1e-7)
  assert abs(y.mean() - 1.0) < 5 * math.sqrt(0.25 * 0.8 / 0.2 / y.size) * 2
  # Neighbouring elements (the two halves of one 32-bit draw) are uncorrelated.
  a, b = kept.reshape(-1)[0::2].astype(float), kept.reshape(-1)[1::2].astype(float)
  assert abs(np.corrcoef(a, b)[0, 1]) < 0.01
  # Another key, another mask; the same key, the same mask; odd sizes work.
  assert (np.asarray(dropout(x, 0.2, jax.random.PRNGKey(1))) != y).any()
  np.testing.assert_array_equal(dropout(x, 0.2, jax.random.PRNGKey(0)), y)
  assert dropout(jnp.ones((3, 5, 7)), 0.5, jax.random.PRNGKey(2)).shape == (3, 5, 7)


def test_dropout_is_off_by_default_and_on_with_a_key():
  cfg = ModelConfig(**dict(CFG.to_dict(), dropout=0.5))
  params = _params(cfg)
  idx = np.zeros((1, 8), np.int32)
  m = _forward(cfg)
  np.testing.assert_array_equal(m({'params': params}, idx), m({'params': params}, idx))
  train = jax.jit(lambda p, x, key: GPT(cfg).apply(p, x, deterministic=False, rngs={'dropout': key}))
  d1 = train({'params': params}, idx, jax.random.PRNGKey(1))
  assert not np.allclose(d1, m({'params': params}, idx))


@pytest.mark.slow
def test_kv_cache_prefill_and_steps_match_full_forward():
  params = _params()
  m = GPT(CFG)
  idx = _tokens((2, 14), 9)
  full = _forward()({'params': params}, idx)

  @jax.jit
  def prefill_then_steps(params, idx):  # One program; the positions are Python ints, as unjitted.
    cache = model_lib.init_cache(CFG, 2)
    logits, cache = m.apply({'params': params}, idx[:, :6], cache, 0, method=GPT.decode)
    steps = []
    for t in range(6, 14):
      step_logits, cache = m.apply({'params': params}, idx[:, t:t + 1], cache, t, method=GPT.decode)
      steps.append(step_logits[:, 0])
    return logits, steps

  logits, steps = prefill_then_steps(params, idx)
  np.testing.assert_allclose(logits, full[:, :6], atol=1e-5)
  for t, step_logits in zip(range(6, 14), steps):
    np.testing.assert_allclose(step_logits, full[:, t], atol=1e-5)


@pytest.mark.slow
def test_kv_cache_chunks_at_traced_positions_match_full_forward():
  """Chunks of several tokens at non-zero (traced) positions see the cache and each other causally."""
  params = _params()
  m = GPT(CFG)
  idx = _tokens((2, 15), 3)
  full = _forward()({'params': params}, idx)
  step = jax.jit(lambda p, chunk, c, pos: m.apply({'params': p}, chunk, c, pos, method=GPT.decode))
  prefill = jax.jit(lambda p, chunk: m.apply({'params': p}, chunk, model_lib.init_cache(CFG, 2), 0,
                                             method=GPT.decode))
  logits, cache = prefill(params, idx[:, :4])
  for s, e in ((4, 9), (9, 10), (10, 15)):
    logits, cache = step(params, idx[:, s:e], cache, jnp.int32(s))
    np.testing.assert_allclose(logits, full[:, s:e], atol=1e-5)
  # The cache holds every position's keys: one more step equals the prefill-everything path.
  _, ref = prefill(params, idx)
  for a, b in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a[:, :, :15], b[:, :, :15], atol=1e-5)


def test_sequence_longer_than_block_is_rejected():
  with pytest.raises(ValueError, match='block_size'):
    _forward()({'params': _params()}, np.zeros((1, CFG.block_size + 1), np.int32))


@pytest.mark.parametrize('bad', [dict(n_embd=30, n_head=4), dict(dropout=1.5), dict(attention='fused'),
                                 dict(n_layer=0), dict(dtype='float8')])
def test_invalid_model_config_is_a_user_error(bad):
  with pytest.raises(UserError, match='invalid model config'):
    ModelConfig(**dict(CFG.to_dict(), **bad))
