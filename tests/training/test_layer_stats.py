"""Per-layer statistics: every logged number equals a direct computation, and they never change
training (the plain step is the original step; the step with statistics updates identically)."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt_jax import optim
from gpt_jax.config import ModelConfig
from gpt_jax.data import batches as batches_lib
from gpt_jax.model import GPT, Block, LayerNorm, Linear
from gpt_jax.training import layer_stats as layer_stats_lib, step as step_lib

CFG = ModelConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
BATCH = 4


def _train_cfg(**overrides):
  from configs import shakespeare
  t = shakespeare.get_config('tiny').train
  t.update(overrides)
  return t


def _data(seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, CFG.vocab_size, 3000), jnp.uint16)


_forward = jax.jit(layer_stats_lib.forward_with_intermediates, static_argnums=1)


@functools.lru_cache(maxsize=None)
def _step(dynamics):
  """The jitted train step on CFG (compiled once per variant for the whole module)."""
  return jax.jit(functools.partial(
      step_lib.train_step, model=GPT(CFG), batch_size=BATCH, grad_accum_steps=1,
      schedule=optim.lr_schedule(_train_cfg()), layer_stats=dynamics))


def _assert_trees_identical(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def one_step():
  """Two plain steps (so Adam's update is not the trivial first one), then the third step both ways."""
  state = step_lib.init_train_state(CFG, _train_cfg())
  for _ in range(2):
    state, _ = _step(False)(state, _data())
  plain = _step(False)(state, _data())
  new_state, metrics = _step(True)(state, _data())
  # The batch the step drew, rebuilt from its key the way train_step does.
  batch_key, _ = jax.random.split(jax.random.fold_in(state.key, state.step))
  x, y = jax.jit(batches_lib.get_batch, static_argnums=(2, 3))(_data(), batch_key, BATCH, CFG.block_size)
  return state, new_state, jax.device_get(metrics), x, y, plain


@pytest.mark.slow
def test_per_layer_norms_equal_direct_computation(one_step):
  state, new_state, m, x, y, _ = one_step
  grads = jax.jit(lambda p: jax.grad(step_lib.loss_fn)(p, GPT(CFG), x, y, None))(state.params)
  d = m['layer_stats']
  assert set(d['grad_norm']) == {'wte', 'wpe', 'h_0', 'h_1', 'ln_f'}
  for k in d['grad_norm']:
    np.testing.assert_allclose(d['grad_norm'][k], optax.tree.norm(grads[k]), rtol=1e-5)
    np.testing.assert_allclose(d['param_norm'][k], optax.tree.norm(state.params[k]), rtol=1e-6)
    delta = jax.tree_util.tree_map(jnp.subtract, new_state.params[k], state.params[k])
    np.testing.assert_allclose(d['update_ratio'][k],
                               optax.tree.norm(delta) / optax.tree.norm(state.params[k]), rtol=1e-5)
    assert 0 < d['update_ratio'][k] < 0.5
  # The per-layer gradient norms make up the global one the step already logs.
  np.testing.assert_allclose(math.sqrt(sum(v ** 2 for v in d['grad_norm'].values())),
                             m['grad_norm'], rtol=1e-5)


@pytest.mark.slow
def test_activation_rms_and_logit_scale_equal_direct_computation(one_step):
  state, _, m, x, _, _ = one_step
  p, xa = state.params, x[:layer_stats_lib.ACT_ROWS]
  h = p['wte'][xa] + p['wpe'][jnp.arange(CFG.block_size)]  # (B, T, C) embeddings, no dropout.
  expect = {'embed': float(jnp.sqrt(jnp.mean(h ** 2)))}
  block = jax.jit(Block(CFG).apply, static_argnums=2)
  for i in range(CFG.n_layer):  # Apply each block on its own, outside the GPT module.
    h, _ = block({'params': p[f'h_{i}']}, h, True)
    expect[f'h_{i}'] = float(jnp.sqrt(jnp.mean(h ** 2)))
  for k, v in expect.items():
    np.testing.assert_allclose(m['layer_stats']['act_rms'][k], v, rtol=1e-5)
  logits = jax.jit(GPT(CFG).apply)({'params': p}, xa)
  np.testing.assert_allclose(m['layer_stats']['logit_std'], np.std(np.asarray(logits), axis=-1).mean(),
                             rtol=1e-5)


def _direct_attention_probs(params, cfg, x):
  """Layer 0's attention probabilities computed by hand in numpy: softmax(q k^T / sqrt(D) + mask)."""
  p = params
  h = p['wte'][x] + p['wpe'][jnp.arange(x.shape[1])]
  h = LayerNorm(cfg.bias).apply({'params': p['h_0']['ln_1']}, h)
  qkv = np.asarray(Linear(3 * cfg.n_embd, cfg.bias).apply({'params': p['h_0']['attn']['c_attn']}, h),
                   np.float64)
  B, T, _ = qkv.shape
  H, D = cfg.n_head, cfg.head_size
  q, k = (qkv[..., i * cfg.n_embd:(i + 1) * cfg.n_embd].reshape(B, T, H, D) for i in (0, 1))
  s = np.einsum('bthd,bshd->bhts', q, k) / math.sqrt(D)
  s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
  e = np.exp(s - s.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)  # (B, H, T, T)


@pytest.mark.slow
def test_attention_entropy_from_sown_probs_equals_direct_computation(one_step):
  state, _, m, x, _, _ = one_step
  xa = x[:layer_stats_lib.ACT_ROWS]
  direct = _direct_attention_probs(state.params, CFG, xa)
  _, inter = _forward(state.params, CFG, xa)
  np.testing.assert_allclose(inter['attn_probs'][0], direct, atol=1e-6)
  with np.errstate(divide='ignore', invalid='ignore'):
    ent = -np.where(direct > 0, direct * np.log(direct), 0.0).sum(-1).mean(axis=(0, 2))  # (H,)
  np.testing.assert_allclose(m['layer_stats']['attn_entropy']['h_0'], ent, rtol=1e-5)
  assert m['layer_stats']['attn_entropy']['h_0'].shape == (CFG.n_head,)
  # Uniform causal attention over T positions has mean entropy mean_t log(t + 1): the ceiling.
  T = CFG.block_size
  uniform = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
  np.testing.assert_allclose(layer_stats_lib.attention_entropy(jnp.asarray(uniform)[None, None]),
                             [layer_stats_lib.uniform_entropy(T)], rtol=1e-6)
  assert np.all(m['layer_stats']['attn_entropy']['h_1'] <= layer_stats_lib.uniform_entropy(T) + 1e-5)


def test_sow_is_a_no_op_unless_intermediates_are_mutable():
  params = jax.jit(GPT(CFG).init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  assert set(params) == {'params'}  # Nothing sown at init.
  x = jnp.asarray(np.random.RandomState(3).randint(0, CFG.vocab_size, (2, CFG.block_size)))
  plain = jax.jit(GPT(CFG).apply)(params, x)
  assert isinstance(plain, jax.Array)  # No extra collections returned.
  logits, inter = _forward(params['params'], CFG, x)
  np.testing.assert_array_equal(plain, logits)
  probs = np.asarray(inter['attn_probs'][1])
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
  assert np.all(np.triu(probs, 1) == 0)  # Causal: no query attends to a later key.
  # The 'xla' backend computes the same function; the instruments read it through the manual path.
  xla = dataclasses.replace(CFG, attention='xla')
  np.testing.assert_allclose(jax.jit(GPT(xla).apply)(params, x),
                             logits, atol=1e-5)


@pytest.mark.slow
def test_only_an_explicit_request_picks_the_kernel_that_records_probabilities():
  """Instrumentation never steers the forward pass: making 'intermediates' mutable leaves a long
  sequence on the block-skipping kernel (nothing recorded); `record_probs=True` is the one switch."""
  from gpt_jax.attention import QUERY_BLOCK
  cfg = dataclasses.replace(CFG, block_size=2 * QUERY_BLOCK)
  params = jax.jit(GPT(cfg).init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  x = jnp.asarray(np.random.RandomState(4).randint(0, cfg.vocab_size, (1, cfg.block_size)))
  sown_apply = lambda m: jax.jit(lambda p, x: m.apply(p, x, mutable=['intermediates']))
  plain, sown = sown_apply(GPT(cfg))(params, x)
  assert 'attn_probs' not in sown['intermediates']['h_0'].get('attn', {})
  recorded, sown = sown_apply(GPT(cfg, record_probs=True))(params, x)
  assert sown['intermediates']['h_0']['attn']['attn_probs'][0].shape == (
      1, cfg.n_head, cfg.block_size, cfg.block_size)
  np.testing.assert_allclose(np.asarray(recorded), np.asarray(plain), atol=1e-5)


@pytest.mark.slow
def test_instrumented_step_trains_exactly_like_the_plain_step(one_step):
  _, on, m_on, _, _, (off, m_off) = one_step
  _assert_trees_identical((off.params, off.opt_state, off.step), (on.params, on.opt_state, on.step))
  for k in ('loss', 'grad_norm', 'lr'):
    assert float(m_off[k]) == float(m_on[k])
  assert 'layer_stats' not in m_off and 'layer_stats' in m_on


def _original_train_step(state, train_data, *, model, batch_size, grad_accum_steps, schedule):
  """gpt_jax.train.train_step as it was before the instruments hook (commit 60c1aff), verbatim."""
  T = model.config.block_size
  batch_key, dropout_key = jax.random.split(jax.random.fold_in(state.key, state.step))
  x, y = batches_lib.get_batch(train_data, batch_key, batch_size * grad_accum_steps, T)
  grad_fn = jax.value_and_grad(step_lib.loss_fn)
  use_dropout = model.config.dropout > 0

  def micro(i, xb, yb):
    return grad_fn(state.params, model, xb, yb,
                   jax.random.fold_in(dropout_key, i) if use_dropout else None)

  if grad_accum_steps == 1:
    loss, grads = micro(0, x, y)
  else:
    xs = x.reshape(grad_accum_steps, batch_size, T)
    ys = y.reshape(grad_accum_steps, batch_size, T)

    def body(acc, inp):
      loss, grads = micro(*inp)
      return jax.tree_util.tree_map(jnp.add, acc, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, state.params))
    (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps), xs, ys))
    loss, grads = jax.tree_util.tree_map(lambda a: a / grad_accum_steps, (loss, grads))

  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'lr': schedule(state.step)}
  return state.apply_gradients(grads=grads), metrics


@pytest.mark.slow
def test_instruments_off_is_the_original_train_step():
  """With dynamics off (the default) train_step traces to the very same program as before the hook,
  and gives bit-identical states."""
  kw = dict(model=GPT(CFG), batch_size=BATCH, schedule=optim.lr_schedule(_train_cfg()))
  state = step_lib.init_train_state(CFG, _train_cfg())
  for accum in (1, 2):  # Both code paths: one micro-batch, and the lax.scan over micro-batches.
    now = jax.make_jaxpr(functools.partial(step_lib.train_step, grad_accum_steps=accum, **kw))
    before = jax.make_jaxpr(functools.partial(_original_train_step, grad_accum_steps=accum, **kw))
    assert str(now(state, _data())) == str(before(state, _data()))
  ref = jax.jit(functools.partial(_original_train_step, grad_accum_steps=1, **kw))
  a, b = state, state
  for _ in range(2):
    a, _ = ref(a, _data())
    b, _ = _step(False)(b, _data())
  _assert_trees_identical(a, b)
