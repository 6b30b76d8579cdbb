"""The speedrun levers (docs/speedrun.md), each tested for its own property; and that, off, nothing changed.

Model: rotary positions, QK-norm, ReLU^2, zero-initialised projections. Optimizer: Muon on the block
matrices, the warmup-stable-decay schedule. KV-cache generation under every option is in
tests/test_sample.py, the two attention backends under them in tests/test_attention.py.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import gpt2 as gpt2_configs, shakespeare
from gpt_jax import checkpoint as checkpoint_lib, config as config_lib, hf, model as model_lib, optim
from gpt_jax.config import ModelConfig, num_params
from gpt_jax.errors import UserError
from gpt_jax.lab import shape_flow
from gpt_jax.model import GPT
from gpt_jax.training import step as step_lib

CFG = ModelConfig(vocab_size=29, block_size=24, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
OPTIONS = {  # One model per option, and all of them at once.
    'rotary': dict(position='rotary'),
    'qk_norm': dict(qk_norm=True),
    'relu2': dict(activation='relu2'),
    'zero_init_proj': dict(zero_init_proj=True),
    'all': dict(position='rotary', qk_norm=True, activation='relu2', zero_init_proj=True, bias=True),
}


def _cfg(**kw) -> ModelConfig:
  return dataclasses.replace(CFG, **kw)


def _params(cfg: ModelConfig, seed: int = 0):
  return jax.jit(model_lib.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(seed))


def _shapes(cfg: ModelConfig):
  """The parameter tree `_params` would return, as shapes and dtypes only: nothing is compiled."""
  return jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0)))


def _tokens(shape, seed=1, vocab=CFG.vocab_size):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab)


def _flat(tree) -> dict[str, jax.Array]:
  return {'.'.join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# --- defaults: exactly the model and optimizer of before --------------------------------------------

# Computed with the code of commit 43b18a8 (before these options existed) by the same procedure as
# the test below: per-leaf sums of squares of the `tiny` preset's initial parameters, its first 8
# training losses on fixed random tokens, and the sum of squares of the parameters after them.
# (Bit-identical on the machine they were made on; compared with a tolerance because other CPUs
# may round the random-normal transform differently.)
TINY_SUMSQ = {
    'h_0.attn.c_attn.kernel': 1.2131595048720936, 'h_0.attn.c_proj.kernel': 0.09955596466961014,
    'h_0.ln_1.scale': 32.0, 'h_0.ln_2.scale': 32.0, 'h_0.mlp.c_fc.kernel': 1.5954011000742319,
    'h_0.mlp.c_proj.kernel': 0.4179337877877135, 'h_1.attn.c_attn.kernel': 1.2122686903439333,
    'h_1.attn.c_proj.kernel': 0.10723833870807227, 'h_1.ln_1.scale': 32.0, 'h_1.ln_2.scale': 32.0,
    'h_1.mlp.c_fc.kernel': 1.596236821102825, 'h_1.mlp.c_proj.kernel': 0.4093807753705433,
    'ln_f.scale': 32.0, 'wpe': 0.3770757602224333, 'wte': 0.8319141722767065}
TINY_LOSSES = [4.182420253753662, 4.186740398406982, 4.196399688720703, 4.1790032386779785,
               4.177488327026367, 4.172213554382324, 4.181396484375, 4.181368827819824]
TINY_AFTER = 167.95639017733203


@pytest.mark.slow
def test_tiny_preset_is_unchanged_from_before_the_options():
  c = shakespeare.get_config('tiny')
  mc = config_lib.model_config_from(c, 65)
  state = step_lib.init_train_state(mc, c.train)
  sumsq = {k: float(np.sum(np.square(np.asarray(v, np.float64)))) for k, v in _flat(state.params).items()}
  assert sorted(sumsq) == sorted(TINY_SUMSQ)
  for k, v in TINY_SUMSQ.items():
    assert sumsq[k] == pytest.approx(v, rel=1e-6), k
  data = jax.random.randint(jax.random.PRNGKey(5), (4000,), 0, 65)
  step = jax.jit(functools.partial(step_lib.train_step, model=GPT(mc), batch_size=c.train.batch_size,
                                   grad_accum_steps=1, schedule=optim.lr_schedule(c.train)))
  losses = []
  for _ in range(len(TINY_LOSSES)):
    state, m = step(state, data)
    losses.append(float(m['loss']))
  np.testing.assert_allclose(losses, TINY_LOSSES, rtol=1e-6)
  after = sum(float(np.sum(np.square(np.asarray(v, np.float64)))) for v in _flat(state.params).values())
  assert after == pytest.approx(TINY_AFTER, rel=1e-6)


@pytest.mark.parametrize('make', [functools.partial(shakespeare.get_config, p) for p in
                                  ('', 'speedrun_gpt2', 'cpu', 'nanogpt_cpu', 'tiny')]
                         + [gpt2_configs.get_config])
def test_presets_keep_every_option_off(make):
  """The presets' model sections mean ModelConfig's defaults (GPT-2), and their optimizer AdamW."""
  c = make()
  m = config_lib.model_config_from(c, 65)
  for field in ('position', 'qk_norm', 'activation', 'zero_init_proj', 'rope_base'):
    assert getattr(m, field) == getattr(ModelConfig(), field), field
  assert m.non_gpt2_options() == []
  assert optim.optimizer_name(c.train.optimizer) == 'adamw' and c.train.lr_schedule == 'cosine'


def test_the_speedrun_preset_is_speedrun_gpt2_with_the_levers_and_nothing_else():
  """The lever recipe differs from GPT-2's record in exactly the documented fields (docs/speedrun.md)."""
  levers = shakespeare.get_config('speedrun').to_dict()
  gpt2 = shakespeare.get_config('speedrun_gpt2').to_dict()
  diff = {(sec, k): (gpt2[sec][k], v) for sec in levers if isinstance(levers[sec], dict)
          for k, v in levers[sec].items() if gpt2[sec][k] != v}
  assert diff == {
      ('model', 'dropout'): (0.1, 0.0), ('model', 'position'): ('learned', 'rotary'),
      ('model', 'qk_norm'): (False, True), ('model', 'activation'): ('gelu', 'relu2'),
      ('model', 'zero_init_proj'): (False, True), ('train', 'optimizer'): ('optax', 'muon'),
      ('train', 'lr_schedule'): ('cosine', 'wsd'), ('train', 'cooldown_fraction'): (0.2, 0.5),
      ('train', 'max_steps'): (5600, 700), ('train', 'lr_decay_steps'): (5600, 700),
      ('train', 'eval_interval'): (500, 700), ('train', 'eval_iters'): (40, 5),
      ('train', 'eval_at_start'): (True, False), ('train', 'muon_batched'): (False, True),
      ('train', 'val_full_pass'): (False, True), ('train', 'ema_decay'): (0.0, 0.99),
      ('sample', 'eval_tokens'): (200, 0)}
  assert levers['out_dir'] != gpt2['out_dir']
  assert levers['train']['target_val_loss'] == gpt2['train']['target_val_loss'] == 1.47


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
  for field in ('position', 'rope_base', 'qk_norm', 'activation', 'zero_init_proj'):
    del old_meta[field]
  assert ModelConfig.from_dict(old_meta) == cfg
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / 'checkpoints'))
  ckpt.save_params(0, params, {'model': old_meta, 'tokenizer': {}})
  ckpt.close()
  loaded_cfg, loaded, _ = checkpoint_lib.load_for_inference(str(tmp_path))
  assert loaded_cfg == cfg
  x = _tokens((2, 9))
  np.testing.assert_array_equal(GPT(loaded_cfg).apply({'params': loaded}, x),
                                GPT(cfg).apply({'params': params}, x))
  checkpoint_lib.check_model_matches({'model': old_meta}, cfg, 'old run')  # Resumable as before.
  with pytest.raises(UserError, match='position'):
    checkpoint_lib.check_model_matches({'model': old_meta}, _cfg(position='rotary'), 'old run')


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
  y = np.asarray(model_lib.rotary(x, positions, base))
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
  rot = lambda x, p: model_lib.rotary(x, p, 10000.0)
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
  norm = model_lib.RMSNorm()
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
