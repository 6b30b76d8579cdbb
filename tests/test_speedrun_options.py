"""The presets and the speedrun options: off, nothing changed; the lever recipe differs from GPT-2's only
where documented.

The model's options are tested in tests/test_model_variants.py, the optimizer's (Muon, WSD, the EMA) in
tests/test_optim_variants.py.
"""

import functools

import jax
import numpy as np
import pytest

from configs import gpt2 as gpt2_configs, shakespeare
from gpt_jax import config as config_lib, optim
from gpt_jax.config import ModelConfig
from gpt_jax.model import GPT
from gpt_jax.training import step as step_lib

import tiny_models

_flat = tiny_models.flat


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
                         + [gpt2_configs.get_config, functools.partial(gpt2_configs.get_config, 'gpt2_gpu')])
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
      ('model', 'zero_init_proj'): (False, True), ('train', 'optimizer'): ('adamw', 'muon'),
      ('train', 'lr_schedule'): ('cosine', 'wsd'), ('train', 'cooldown_fraction'): (0.2, 0.5),
      ('train', 'max_steps'): (5600, 700), ('train', 'lr_decay_steps'): (5600, 700),
      ('train', 'eval_interval'): (500, 700), ('train', 'eval_iters'): (40, 5),
      ('train', 'eval_at_start'): (True, False), ('train', 'muon_batched'): (False, True),
      ('train', 'val_full_pass'): (False, True), ('train', 'ema_decay'): (0.0, 0.99),
      ('sample', 'eval_tokens'): (200, 0)}
  assert levers['out_dir'] != gpt2['out_dir']
  assert levers['train']['target_val_loss'] == gpt2['train']['target_val_loss'] == 1.47
