"""The departures from GPT-2 (gpt_jax/model_variants.py), each tested for its own property.

Speedrun options: rotary positions, QK-norm, ReLU^2, zero-initialised projections. Ablations
(`model.ablate`): each takes one piece out of GPT-2 (attention, positions, residual connections,
LayerNorm, multiple heads, the MLP). Off (the default) the model is GPT-2 exactly, which the golden
losses and the Hugging Face parity tests check.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shakespeare
from gpt_jax import (
  checkpoint as checkpoint_lib,
  checkpoint_damage,
  config as config_lib,
  hf,
  model as model_lib,
  model_variants as variants,
  optim,
)
from gpt_jax.config import ABLATIONS, ModelConfig, num_params
from gpt_jax.errors import UserError
from gpt_jax.lab import shape_flow
from gpt_jax.model import GPT
from gpt_jax.training import step as step_lib

import tiny_models

CFG = tiny_models.CFG
_cfg = tiny_models.cfg
_params = functools.lru_cache(maxsize=None)(tiny_models.params)  # Many tests read the same trees.
_shapes = tiny_models.shapes
_tokens = tiny_models.tokens
_flat = tiny_models.flat
OPTIONS = {  # One model per speedrun option, and all of them at once.
    'rotary': dict(position='rotary'),
    'qk_norm': dict(qk_norm=True),
    'relu2': dict(activation='relu2'),
    'zero_init_proj': dict(zero_init_proj=True),
    'all': dict(position='rotary', qk_norm=True, activation='relu2', zero_init_proj=True, bias=True),
}


@functools.lru_cache(maxsize=None)
def _forward(cfg: ModelConfig):
  return jax.jit(lambda p, x: GPT(cfg).apply({'params': p}, x))


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


# --- the speedrun options: off, the GPT-2 tree; on, each its own property ----------------------------

def test_options_off_is_the_default_parameter_tree():
  """Default config: the GPT-2 names and shapes, nothing more."""
  p = _shapes(_cfg(bias=True))
  C, V, S = CFG.n_embd, CFG.vocab_size, CFG.block_size
  want = {'wte': (V, C), 'wpe': (S, C), 'ln_f.scale': (C,), 'ln_f.bias': (C,)}
  for i in range(CFG.n_layer):
    for name, shape in (('ln_1', (C,)), ('ln_2', (C,))):
      want.update({f'h_{i}.{name}.scale': shape, f'h_{i}.{name}.bias': shape})
    for name, (n_in, n_out) in (('attn.c_attn', (C, 3 * C)), ('attn.c_proj', (C, C)),
                                ('mlp.c_fc', (C, 4 * C)), ('mlp.c_proj', (4 * C, C))):
      want.update({f'h_{i}.{name}.kernel': (n_in, n_out), f'h_{i}.{name}.bias': (n_out,)})
  assert {k: v.shape for k, v in _flat(p).items()} == want


@pytest.mark.slow
def test_old_checkpoint_without_the_new_fields_loads_as_gpt2(tmp_path):
  """A checkpoint whose saved model config predates the options loads, as the model it was."""
  cfg = _cfg()
  params = _params(cfg)
  old_meta = cfg.to_dict()
  for field in ('position', 'rope_base', 'qk_norm', 'activation', 'zero_init_proj', 'ablate'):
    del old_meta[field]
  assert ModelConfig.from_dict(old_meta) == cfg
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / 'checkpoints'))
  ckpt.save_params(0, params, {'model': old_meta, 'tokenizer': {}})
  ckpt.close()
  loaded_cfg, loaded, _ = checkpoint_lib.load_for_inference(str(tmp_path))
  assert loaded_cfg == cfg
  x = _tokens((2, 9))
  np.testing.assert_array_equal(_forward(loaded_cfg)(loaded, x), _forward(cfg)(params, x))
  checkpoint_damage.check_model_matches({'model': old_meta}, cfg, 'old run')  # Resumable as before.
  with pytest.raises(UserError, match='position'):
    checkpoint_damage.check_model_matches({'model': old_meta}, _cfg(position='rotary'), 'old run')


@pytest.mark.parametrize('bad, message', [
    (dict(position='alibi'), 'model.position'), (dict(activation='swiglu'), 'model.activation'),
    (dict(position='rotary', n_embd=30, n_head=2), 'even'), (dict(rope_base=0.0), 'rope_base')])
def test_invalid_option_is_a_user_error(bad, message):
  with pytest.raises(UserError, match=message):
    _cfg(**bad)


@pytest.mark.parametrize('name', OPTIONS)
def test_parameter_count_and_flops_follow_the_options(name):
  cfg = _cfg(**OPTIONS[name])
  p = _shapes(cfg)
  assert model_lib.count_params(p) == num_params(cfg)
  assert ('wpe' in p) == (cfg.position == 'learned')
  n, flops = shape_flow.totals(shape_flow.shape_flow(cfg))
  assert (n, flops) == (num_params(cfg), config_lib.flops_per_token(cfg))


# --- Hugging Face: only GPT-2 exports ------------------------------------------------------------------

@pytest.mark.parametrize('name, named', [('rotary', 'model.position'), ('qk_norm', 'model.qk_norm'),
                                         ('relu2', 'model.activation'), ('all', 'model.position')])
def test_hf_export_refuses_non_gpt2_options(tmp_path, name, named):
  cfg = _cfg(**OPTIONS[name])
  with pytest.raises(UserError, match=named):
    hf.save_gpt2(GPT(cfg), _shapes(cfg), str(tmp_path / 'hf'))
  assert not (tmp_path / 'hf').exists()  # Refused before anything was written.
  with pytest.raises(UserError, match=named):
    hf.state_dict_from_params(_shapes(cfg), cfg)


def test_hf_export_accepts_zero_init_proj(tmp_path):
  """zero_init_proj only changes where training starts: the model is still a GPT-2."""
  cfg = _cfg(zero_init_proj=True, bias=True)
  hf.save_gpt2(GPT(cfg), _params(cfg), str(tmp_path / 'hf'))
  _, params = hf.load_gpt2(str(tmp_path / 'hf'))
  np.testing.assert_array_equal(params['h_1']['mlp']['c_proj']['kernel'], 0.0)


# --- rotary ---------------------------------------------------------------------------------------

def _scores(q, k):  # (..., T, D) x (..., S, D) -> (..., T, S)
  return jnp.einsum('...td,...sd->...ts', q, k)


def test_rotary_is_the_rotation_of_each_dimension_pair():
  """Pair (i, i + D/2) turns by position * base^(-2i/D); position 0 is the identity."""
  D, base = 8, 10000.0
  x = jax.random.normal(jax.random.PRNGKey(0), (3, D))
  positions = jnp.array([0, 5, 77])
  y = np.asarray(variants.rotary(x, positions, base))
  np.testing.assert_allclose(y[0], x[0], rtol=1e-6)
  for row, p in zip(range(3), (0, 5, 77)):
    for i in range(D // 2):
      a = p * base ** (-2 * i / D)
      u, v = float(x[row, i]), float(x[row, i + D // 2])
      np.testing.assert_allclose(y[row, [i, i + D // 2]],
                                 [u * math.cos(a) - v * math.sin(a), u * math.sin(a) + v * math.cos(a)],
                                 rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize('shift', [1, 7, 100])
def test_rotary_scores_depend_only_on_relative_position(shift):
  """q_t . k_s after the rotation is unchanged when every position moves by `shift`; with a learned
  position table added to the inputs instead (GPT-2) it is not."""
  T, D = 12, 16
  kq, kk, ke = jax.random.split(jax.random.PRNGKey(3), 3)
  q, k = jax.random.normal(kq, (2, 3, T, D)), jax.random.normal(kk, (2, 3, T, D))
  pos = jnp.arange(T)
  rot = lambda x, p: variants.rotary(x, p, 10000.0)
  base_scores = _scores(rot(q, pos), rot(k, pos))
  shifted = _scores(rot(q, pos + shift), rot(k, pos + shift))
  np.testing.assert_allclose(shifted, base_scores, atol=2e-5 * shift ** 0.5 * 10)
  assert not np.allclose(base_scores, _scores(q, k), atol=1e-2)  # The rotation did act.
  # Learned positions: q = (x + wpe[t]) Wq, k = (x + wpe[s]) Wk.
  wpe = 0.5 * jax.random.normal(ke, (T + shift, D))
  learned = lambda p: _scores(q + wpe[p], k + wpe[p])
  assert not np.allclose(learned(pos + shift), learned(pos), atol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize('position', ['rotary', 'learned'])
def test_rotary_model_logits_do_not_depend_on_where_the_window_starts(position):
  """The whole model run at positions offset..offset+T-1: the same logits as from 0 with rotary
  (what makes re-encoding a window from position 0 in generation harmless), other logits with
  learned positions."""
  cfg = _cfg(position=position, qk_norm=True, bias=True)
  p = jax.tree_util.tree_map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(9), a.shape),
                             _params(cfg))
  x = _tokens((2, 12))
  forward = jax.jit(lambda p, offset: GPT(cfg).apply({'params': p}, x, True, None, offset,
                                                     method=GPT._forward)[0])
  at0, at9 = forward(p, 0), forward(p, 9)
  if position == 'rotary':
    np.testing.assert_allclose(at9, at0, atol=2e-5)
  else:
    assert float(jnp.max(jnp.abs(at9 - at0))) > 1e-2


# --- QK-norm, ReLU^2, zero-initialised projections --------------------------------------------------

def test_qk_norm_gives_unit_rms_queries_and_keys_per_head():
  cfg = _cfg(qk_norm=True, n_head=4)
  attn = model_lib.CausalSelfAttention(cfg)
  x = 3.0 * jax.random.normal(jax.random.PRNGKey(4), (2, 10, cfg.n_embd))
  variables = jax.jit(attn.init, static_argnums=2)(jax.random.PRNGKey(0), x, True)
  _, state = jax.jit(lambda v, x: attn.apply(v, x, True, capture_intermediates=True,
                                             mutable=['intermediates']))(variables, x)
  inter = state['intermediates']
  raw = jax.jit(model_lib.Linear(3 * cfg.n_embd, cfg.bias).apply)(
      {'params': variables['params']['c_attn']}, x).reshape(2, 10, 3, 4, cfg.head_size)
  for name, raw_x in (('q_norm', raw[:, :, 0]), ('k_norm', raw[:, :, 1])):
    out = inter[name]['__call__'][0]  # (B, H, T, D)
    rms = jnp.sqrt(jnp.mean(jnp.square(out), axis=-1))
    np.testing.assert_allclose(rms, 1.0, atol=1e-4)  # Per batch row, head and position.
    raw_rms = jnp.sqrt(jnp.mean(jnp.square(raw_x), axis=-1))
    assert not np.allclose(raw_rms, 1.0, atol=0.2)  # ... which the raw projections are not.
    # Same direction as the raw projection: normalising only rescales each head's vector.
    cos = jnp.sum(out * raw_x.transpose(0, 2, 1, 3), -1) / (
        jnp.linalg.norm(out, axis=-1) * jnp.linalg.norm(raw_x.transpose(0, 2, 1, 3), axis=-1))
    np.testing.assert_allclose(cos, 1.0, atol=1e-5)


def test_qk_norm_scale_is_learned_and_multiplies():
  norm = variants.RMSNorm()
  x = jax.random.normal(jax.random.PRNGKey(5), (3, 8)) * 4 + 1
  scale = jnp.arange(1.0, 9.0)
  y = norm.apply({'params': {'scale': scale}}, x)
  want = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(y, want, rtol=1e-5)


def test_relu2_is_relu_squared_in_the_mlp():
  x = jnp.linspace(-4, 4, 101)
  cfg = ModelConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4, dropout=0.0,
                    activation='relu2')
  # Identity-like weights expose the activation (as in test_model's GELU test).
  p = {'c_fc': {'kernel': jnp.eye(4, 16)}, 'c_proj': {'kernel': jnp.eye(16, 4)}}
  mlp = lambda cfg: jax.jit(model_lib.MLP(cfg).apply, static_argnums=2)
  y = mlp(cfg)({'params': p}, jnp.broadcast_to(x[:, None], (101, 4))[None], True)
  np.testing.assert_allclose(y[0, :, 0], jnp.square(jax.nn.relu(x)), rtol=1e-6, atol=1e-7)
  gelu = mlp(dataclasses.replace(cfg, activation='gelu'))(
      {'params': p}, jnp.broadcast_to(x[:, None], (101, 4))[None], True)
  assert not np.allclose(gelu, y, atol=1e-3)


@pytest.mark.slow
def test_zero_init_proj_makes_every_block_the_identity_at_init():
  """Logits at init equal those of a model with no blocks: ln_f(wte[x] + wpe) @ wte^T."""
  cfg = _cfg(zero_init_proj=True, bias=True)
  p = _params(cfg)
  for i in range(cfg.n_layer):
    for m in ('attn', 'mlp'):
      np.testing.assert_array_equal(p[f'h_{i}'][m]['c_proj']['kernel'], 0.0)
  # Only those kernels differ from the default init with the same key.
  default = _flat(_params(dataclasses.replace(cfg, zero_init_proj=False)))
  for k, v in _flat(p).items():
    if not k.endswith('c_proj.kernel'):
      np.testing.assert_array_equal(v, default[k], err_msg=k)
  x = _tokens((2, 10))
  h = jnp.take(p['wte'], x, axis=0) + p['wpe'][:10]
  no_blocks = model_lib.LayerNorm(True).apply({'params': p['ln_f']}, h) @ p['wte'].T
  np.testing.assert_allclose(jax.jit(GPT(cfg).apply)({'params': p}, x), no_blocks, atol=1e-5)
  # ... and it trains: the projections get gradients from the first step.
  y = _tokens((2, 10), seed=2)
  grads = jax.jit(jax.grad(lambda p: step_lib.loss_fn(p, GPT(cfg), x, y, None)))(p)
  for i in range(cfg.n_layer):
    for m in ('attn', 'mlp'):
      assert float(jnp.abs(grads[f'h_{i}'][m]['c_proj']['kernel']).max()) > 0


# --- ablations: the switch itself ------------------------------------------------------------------------------

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
  probs = jax.jit(lambda p: GPT(cfg, record_probs=True).apply({'params': p}, x, mutable=['intermediates'])[1])(
      params)
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
