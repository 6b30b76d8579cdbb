"""The departures from GPT-2, each tested for its own property: the ablation switches (`model.ablate`).

Each ablation takes one piece out of GPT-2 (attention, positions, residual connections, LayerNorm,
multiple heads, the MLP); off (the default) the model is GPT-2 exactly, which the golden losses and the
Hugging Face parity tests check.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shakespeare
from gpt_jax import hf, model as model_lib, optim
from gpt_jax.config import ABLATIONS, ModelConfig, num_params
from gpt_jax.errors import UserError
from gpt_jax.model import GPT
from gpt_jax.training import step as step_lib

CFG = ModelConfig(vocab_size=29, block_size=24, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def _cfg(**kw) -> ModelConfig:
  return dataclasses.replace(CFG, **kw)


@functools.lru_cache(maxsize=None)
def _params(cfg: ModelConfig, seed: int = 0):
  return jax.jit(model_lib.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(seed))


def _shapes(cfg: ModelConfig):
  """The parameter tree `_params` would return, as shapes and dtypes only: nothing is compiled."""
  return jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0)))


@functools.lru_cache(maxsize=None)
def _forward(cfg: ModelConfig):
  return jax.jit(lambda p, x: GPT(cfg).apply({'params': p}, x))


def _tokens(shape, seed=1, vocab=CFG.vocab_size):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab)


def _flat(tree) -> dict:
  return {'.'.join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _subset(params, like):
  """`params` cut down to the names of the tree `like` (an ablated model's)."""
  keep = _flat(like)
  return _unflatten({k: v for k, v in _flat(params).items() if k in keep})


def _unflatten(flat: dict) -> dict:
  out: dict = {}
  for name, leaf in flat.items():
    *parents, last = name.split('.')
    d = out
    for p in parents:
      d = d.setdefault(p, {})
    d[last] = leaf
  return out


# --- the switch itself ------------------------------------------------------------------------------

def test_ablate_is_off_by_default_and_gpt2():
  assert ModelConfig().ablate == '' and ModelConfig().ablated == frozenset()
  assert ModelConfig().non_gpt2_options() == []


def test_ablate_takes_a_comma_separated_subset():
  cfg = _cfg(ablate='attention, mlp,heads')
  assert cfg.ablated == {'attention', 'mlp', 'heads'}
  assert cfg.heads == 1 and cfg.head_size == CFG.n_embd
  assert _cfg(ablate=','.join(ABLATIONS)).ablated == set(ABLATIONS)


@pytest.mark.parametrize('bad', ['attn', 'attention,dropout', 'MLP'])
def test_unknown_ablation_is_a_user_error_listing_the_valid_ones(bad):
  with pytest.raises(UserError, match='model.ablate') as e:
    _cfg(ablate=bad)
  for name in ABLATIONS:
    assert repr(name) in str(e.value)


@pytest.mark.parametrize('name', ABLATIONS)
def test_an_ablated_model_is_not_gpt2_and_hf_export_refuses_it(tmp_path, name):
  cfg = _cfg(ablate=name)
  assert cfg.non_gpt2_options() == [f'model.ablate={name!r}']
  with pytest.raises(UserError, match='model.ablate'):
    hf.save_gpt2(GPT(cfg), _shapes(cfg), str(tmp_path / 'hf'))
  assert not (tmp_path / 'hf').exists()  # Refused before anything was written.
  with pytest.raises(UserError, match='model.ablate'):
    hf.state_dict_from_params(_shapes(cfg), cfg)


# --- the parameter tree -----------------------------------------------------------------------------

# What each ablation removes from the parameter tree (GPT-2's names stay for whatever remains).
REMOVED = {
    'attention': (),  # c_attn and c_proj stay: the values are still projected.
    'positions': ('wpe',),
    'residual': (),
    'layernorm': ('ln_1', 'ln_2', 'ln_f'),
    'heads': (),
    'mlp': ('mlp', 'ln_2'),
}


@pytest.mark.parametrize('bias', [False, True])
@pytest.mark.parametrize('name', list(ABLATIONS) + ['all'])
def test_each_ablation_removes_exactly_its_parameters_and_num_params_agrees(name, bias):
  names = list(ABLATIONS) if name == 'all' else [name]
  for kw in (dict(), dict(qk_norm=True), dict(position='rotary')):
    full, cfg = _cfg(bias=bias, **kw), _cfg(bias=bias, ablate=','.join(names), **kw)
    full_shapes, shapes = _flat(_shapes(full)), _flat(_shapes(cfg))
    gone = {n for a in names for n in REMOVED[a]}
    want = {k: v.shape for k, v in full_shapes.items() if not set(k.split('.')) & gone}
    want.update({k: (cfg.head_size,) for k in want if '_norm.' in k})  # QK-norm: per head, one head.
    assert {k: v.shape for k, v in shapes.items()} == want
    assert model_lib.count_params(_shapes(cfg)) == num_params(cfg)
    assert num_params(cfg, non_embedding=True) <= num_params(cfg)


# --- what each ablation computes --------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('name', ABLATIONS)
def test_each_ablation_changes_the_function(name):
  cfg = _cfg(bias=True, ablate=name)
  # Larger weights than at init, where attention is near uniform and so heads hardly matter.
  params = jax.tree_util.tree_map(lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(9), a.shape),
                                  _params(_cfg(bias=True)))
  x = _tokens((2, 12))
  full = _forward(_cfg(bias=True))(params, x)
  ablated = _forward(cfg)(_subset(params, _shapes(cfg)), x)
  assert float(jnp.max(jnp.abs(ablated - full))) > 1e-3


@pytest.mark.slow
def test_no_attention_makes_each_position_see_only_its_own_token_and_position():
  """d logits[t] / d (input vector at position s) is exactly zero for every s != t (through the
  position table, as the causality test in tests/test_model.py), and changing another token changes
  nothing at t."""
  cfg = _cfg(ablate='attention')
  params = _params(cfg)
  T = 9
  idx = _tokens((1, T), 2)

  def summed_logits(wpe):  # (T,): one number per output position
    return GPT(cfg).apply({'params': dict(params, wpe=wpe)}, idx)[0].sum(-1)

  jac = jax.jit(jax.jacrev(summed_logits))(params['wpe'])  # (T, block_size, C)
  for t in range(T):
    norms = np.asarray(jnp.linalg.norm(jac[t, :T], axis=-1))
    assert norms[t] > 0, f'position {t} ignores its own position: {norms}'
    assert np.all(np.delete(norms, t) == 0.0), f'position {t} sees other positions: {norms}'
  a = _forward(cfg)(params, idx)
  for s in (0, 4, T - 1):
    other = idx.at[0, s].set((idx[0, s] + 1) % cfg.vocab_size)
    b = _forward(cfg)(params, other)
    np.testing.assert_array_equal(np.delete(np.asarray(a), s, axis=1), np.delete(np.asarray(b), s, axis=1))
    assert not np.allclose(a[:, s], b[:, s])


@pytest.mark.slow
@pytest.mark.parametrize('position', ['learned', 'rotary'])
def test_no_positions_makes_identical_tokens_alike_and_the_prefix_a_set(position):
  """Without position information: (a) with attention also ablated, one token gives the same logits
  at every position; (b) in a one-layer model the last position's logits do not depend on the order
  of the tokens before it (causal attention without positions sees its past as a set). GPT-2 itself
  does neither. (Rotary positions act only on attention scores, so with attention ablated a rotary
  model has no position information either: (a) is contrasted with learned positions only.)"""
  x = jnp.full((1, 10), 3, jnp.int32)
  for ablate, same in (('positions,attention', True), ('attention', position == 'rotary')):
    cfg = _cfg(position=position, ablate=ablate)
    logits = _forward(cfg)(_params(cfg), x)[0]
    assert np.allclose(logits, logits[:1], atol=1e-6) == same, ablate
  seq = _tokens((1, 12), 5)
  shuffled = jnp.concatenate([seq[:, :11][:, ::-1], seq[:, 11:]], axis=1)
  assert not np.array_equal(seq, shuffled)
  for ablate, same in (('positions', True), ('', False)):
    # One layer: a second one's keys at earlier positions would depend on the order before them.
    cfg = _cfg(position=position, ablate=ablate, n_layer=1)
    a, b = (_forward(cfg)(_params(cfg), s)[0, -1] for s in (seq, shuffled))
    assert np.allclose(a, b, atol=1e-5) == same, ablate


@pytest.mark.slow
def test_no_positions_is_gpt2_with_a_zero_position_table():
  cfg = _cfg(bias=True, ablate='positions')
  params = _params(_cfg(bias=True))
  x = _tokens((2, 12))
  np.testing.assert_array_equal(_forward(cfg)(_subset(params, _shapes(cfg)), x),
                                _forward(_cfg(bias=True))(dict(params, wpe=jnp.zeros_like(params['wpe'])), x))


@pytest.mark.slow
def test_no_residual_with_zero_projections_loses_the_input():
  """zero_init_proj makes every sub-layer output zero at the start: with the residual connections the
  embedding still reaches the output; without them nothing does, so the logits are all zero."""
  x = _tokens((2, 12))
  with_res = _forward(_cfg(zero_init_proj=True))(_params(_cfg(zero_init_proj=True)), x)
  cfg = _cfg(zero_init_proj=True, ablate='residual')
  without = _forward(cfg)(_params(cfg), x)
  np.testing.assert_array_equal(without, 0.0)
  assert float(jnp.std(with_res)) > 1e-3


@pytest.mark.slow
def test_one_head_is_gpt2_with_n_head_1():
  cfg = _cfg(bias=True, ablate='heads')
  params = _params(_cfg(bias=True))
  x = _tokens((2, 12))
  np.testing.assert_array_equal(_forward(cfg)(params, x), _forward(_cfg(bias=True, n_head=1))(params, x))
  probs = GPT(cfg, record_probs=True).apply({'params': params}, x, mutable=['intermediates'])[1]
  assert probs['intermediates']['h_0']['attn']['attn_probs'][0].shape == (2, 1, 12, 12)


@pytest.mark.slow
def test_no_mlp_is_gpt2_with_zero_mlp_outputs():
  cfg = _cfg(bias=True, ablate='mlp')
  params = _params(_cfg(bias=True))
  x = _tokens((2, 12))
  zeroed = _unflatten({k: jnp.zeros_like(v) if '.mlp.c_proj.' in k else v for k, v in _flat(params).items()})
  # x + ln_2 ... + 0 == x: the same logits to the bit, and ln_2 is then unused too.
  np.testing.assert_array_equal(_forward(cfg)(_subset(params, _shapes(cfg)), x),
                                _forward(_cfg(bias=True))(zeroed, x))


@pytest.mark.slow
@pytest.mark.parametrize('name', list(ABLATIONS) + ['all'])
def test_ablated_model_decodes_with_the_cache_as_it_runs_whole(name):
  """Prefill + one-token steps against the KV cache give the full forward's logits (generation works)."""
  cfg = _cfg(ablate=','.join(ABLATIONS) if name == 'all' else name, position='rotary', bias=True)
  params = _params(cfg)
  x = _tokens((2, 10))
  full = _forward(cfg)(params, x)
  decode = jax.jit(lambda p, idx, cache, pos: GPT(cfg).apply({'params': p}, idx, cache, pos,
                                                             method=GPT.decode))
  logits, cache = decode(params, x[:, :6], model_lib.init_cache(cfg, 2), 0)
  steps = [logits]
  for t in range(6, 10):
    logits, cache = decode(params, x[:, t:t + 1], cache, t)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize('name', ABLATIONS)
def test_tiny_ablated_model_trains_with_finite_loss(name):
  cfg = ModelConfig(vocab_size=29, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1,
                    ablate=name)
  t = shakespeare.get_config('tiny').train
  t.update(batch_size=4, warmup_steps=0)
  state = step_lib.init_train_state(cfg, t)
  data = _tokens((2000,), 3)
  step = jax.jit(functools.partial(step_lib.train_step, model=GPT(cfg), batch_size=4, grad_accum_steps=1,
                                   schedule=optim.lr_schedule(t)))
  losses = []
  for _ in range(4):
    state, m = step(state, data)
    losses.append(float(m['loss']))
  assert np.all(np.isfinite(losses)) and losses[-1] != losses[0], losses
