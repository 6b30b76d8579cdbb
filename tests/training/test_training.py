"""Training: learning, gradient accumulation, exact resume, divergence handling, run-directory safety."""

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import checkpoint as checkpoint_lib, config as config_lib, optim
from gpt_jax.config import ModelConfig
from gpt_jax.data import text as text_lib
from gpt_jax.errors import UserError
from gpt_jax.model import GPT
from gpt_jax.training import evaluator as evaluator_lib, loop as loop_lib, step as step_lib


def _read_metrics(out_dir):
  with open(f'{out_dir}/metrics.jsonl', encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _step_losses(records):
  """{step: train_loss} of the per-step log lines (not the eval lines), last write wins."""
  return {r['step']: r['train_loss'] for r in records if 'val_loss' not in r and 'event' not in r}


def _setup(cfg_overrides=None, **train_overrides):
  model_cfg = ModelConfig(**dict(dict(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=32,
                                       dropout=0.0), **(cfg_overrides or {})))
  from configs import shakespeare
  train_cfg = shakespeare.get_config('tiny').train
  train_cfg.update(train_overrides)
  return model_cfg, train_cfg


def _step_fn(model_cfg, train_cfg, batch_size, accum):
  return jax.jit(functools.partial(
      step_lib.train_step, model=GPT(model_cfg), batch_size=batch_size, grad_accum_steps=accum,
      schedule=optim.lr_schedule(train_cfg)))


@pytest.mark.slow
def test_overfits_one_batch():
  model_cfg, train_cfg = _setup(learning_rate=3e-3, warmup_steps=0, lr_decay_steps=1000,
                                min_learning_rate=3e-3, weight_decay=0.0)
  state = step_lib.init_train_state(model_cfg, train_cfg)
  data = jnp.asarray(np.random.RandomState(0).randint(0, 20, 17), jnp.uint16)  # Exactly one window.
  step = _step_fn(model_cfg, train_cfg, 4, 1)
  first = None
  for _ in range(150):
    state, m = step(state, data)
    first = first if first is not None else float(m['loss'])
  assert first > 2.5 and float(m['loss']) < 0.05


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch():
  model_cfg, train_cfg = _setup()
  data = jnp.asarray(np.random.RandomState(1).randint(0, 20, 5000), jnp.uint16)
  big = step_lib.init_train_state(model_cfg, train_cfg)
  small = step_lib.init_train_state(model_cfg, train_cfg)
  step_big, step_small = _step_fn(model_cfg, train_cfg, 8, 1), _step_fn(model_cfg, train_cfg, 2, 4)
  for _ in range(3):
    big, mb = step_big(big, data)
    small, ms = step_small(small, data)
    np.testing.assert_allclose(float(mb['loss']), float(ms['loss']), rtol=1e-5)
    np.testing.assert_allclose(float(mb['grad_norm']), float(ms['grad_norm']), rtol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(big.params), jax.tree_util.tree_leaves(small.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_step_is_deterministic():
  model_cfg, train_cfg = _setup(cfg_overrides={'dropout': 0.1})
  data = jnp.asarray(np.random.RandomState(2).randint(0, 20, 5000), jnp.uint16)
  step = _step_fn(model_cfg, train_cfg, 4, 1)
  s1, m1 = step(step_lib.init_train_state(model_cfg, train_cfg), data)
  s2, m2 = step(step_lib.init_train_state(model_cfg, train_cfg), data)
  assert float(m1['loss']) == float(m2['loss'])
  assert int(s1.step) == 1


@pytest.mark.slow
def test_dropout_key_changes_with_step_on_a_fixed_batch():
  # The same parameters and the same batch at steps 0 and 1: only the step's dropout key differs, so
  # the masks and the loss must differ (a dropout key that ignores the step would give equal losses).
  model_cfg, train_cfg = _setup(cfg_overrides={'dropout': 0.1})
  x = jnp.asarray(np.random.RandomState(2).randint(0, 20, (4, 16)), jnp.int32)
  fixed = lambda inputs, key, rows: (x, jnp.roll(x, -1, axis=1))  # Ignores the batch key.
  step = jax.jit(functools.partial(step_lib.train_step, model=GPT(model_cfg), batch_size=4,
                                   grad_accum_steps=1, schedule=optim.lr_schedule(train_cfg),
                                   draw=fixed))
  state = step_lib.init_train_state(model_cfg, train_cfg)
  losses = [float(step(state.replace(step=jnp.asarray(s, state.step.dtype)), None)[1]['loss'])
            for s in (0, 1, 0)]
  assert losses[0] == losses[2]  # Deterministic: the batch really is fixed.
  assert losses[0] != losses[1]
  masks = [jax.random.bernoulli(step_lib.step_keys(state.replace(step=s))[1], 0.9, (64,))
           for s in (0, 1)]
  assert not np.array_equal(masks[0], masks[1])


@pytest.mark.slow
def test_lr_reported_follows_schedule():
  model_cfg, train_cfg = _setup(warmup_steps=4, learning_rate=1e-3)
  data = jnp.asarray(np.random.RandomState(3).randint(0, 20, 500), jnp.uint16)
  step = _step_fn(model_cfg, train_cfg, 2, 1)
  state = step_lib.init_train_state(model_cfg, train_cfg)
  lrs = []
  for _ in range(5):
    state, m = step(state, data)
    lrs.append(float(m['lr']))
  np.testing.assert_allclose(lrs, [0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3], rtol=1e-6)


@pytest.mark.slow
def test_full_run_learns_logs_and_checkpoints(tiny_config):
  tiny_config.train.max_steps = 60
  tiny_config.train.eval_interval = 30
  tiny_config.train.target_val_loss = target = 3.3  # Below the ~ln(vocab) start, reached by step 60.
  summary = loop_lib.train_and_evaluate(tiny_config)
  recs = _read_metrics(tiny_config.out_dir)
  evals = [r for r in recs if 'val_loss' in r]
  assert [r['step'] for r in evals] == [0, 30, 60]
  assert evals[0]['val_loss'] > evals[-1]['val_loss'] + 0.5  # It learns.
  assert abs(evals[0]['val_loss'] - math.log(summary_vocab(tiny_config))) < 0.3  # Starts ~uniform.
  for r in recs:
    assert {'step', 'train_loss', 'lr'} <= set(r) or r.get('event') in ('target_reached', 'startup')
  assert all(isinstance(r['sample'], str) and r['sample'] for r in evals)
  steps_logged = [r for r in recs if 'ms_per_step' in r]
  assert steps_logged and all(r['tokens_per_s'] > 0 and r['mfu'] > 0 for r in steps_logged)
  assert summary['final_step'] == 60
  assert summary['best_val_loss'] == min(r['val_loss'] for r in evals)
  # Time to target: the first eval at or below it, logged once as an event.
  first = next(r for r in evals if r['val_loss'] <= target)
  assert first['step'] > 0
  assert summary['target_reached'] == {'step': first['step'], 'time': first['time'],
                                       'val_loss': first['val_loss']}
  events = [r for r in recs if r.get('event') == 'target_reached']
  assert len(events) == 1 and events[0]['step'] == first['step']
  # Checkpoints ('best' mode): one at every eval after step 0 that improved the val loss, each
  # holding that step's state and metadata; the best one is the lowest.
  improved = [r['step'] for i, r in enumerate(evals)
              if r['step'] > 0 and r['val_loss'] < min(e['val_loss'] for e in evals[:i])]
  ckpt = checkpoint_lib.Checkpointer(f'{tiny_config.out_dir}/checkpoints', tiny_config.checkpoint)
  assert ckpt.steps() == improved and improved[-1] == 60
  best = min(evals, key=lambda r: r['val_loss'])
  assert ckpt.best_step() == best['step'] and ckpt.meta(best['step'])['val_loss'] == best['val_loss']
  meta = ckpt.meta(60)
  assert meta['step'] == 60 and meta['model']['n_embd'] == tiny_config.model.n_embd
  assert meta['tokenizer'] == text_lib.Dataset(tiny_config.data.data_dir).tokenizer.to_dict()
  model_cfg = config_lib.model_config_from(tiny_config, summary_vocab(tiny_config))
  abstract = jax.eval_shape(lambda: step_lib.init_train_state(model_cfg, tiny_config.train))
  assert int(ckpt.restore_state(60, abstract).step) == 60
  ckpt.close()


def summary_vocab(config):
  return text_lib.Dataset(config.data.data_dir).meta['vocab_size']


@pytest.mark.slow
@pytest.mark.parametrize('dropout', [0.0, 0.1])
def test_resume_reproduces_an_uninterrupted_run(tiny_config, tmp_path, dropout):
  tiny_config.model.dropout = dropout
  tiny_config.train.update(max_steps=40, eval_interval=20, log_interval=1)
  tiny_config.checkpoint.save = 'always'
  straight = _step_losses(_run(tiny_config, str(tmp_path / 'straight')))

  tiny_config.train.max_steps = 20  # Stop half-way (after the checkpoint at step 20) ...
  _run(tiny_config, str(tmp_path / 'resumed'))
  tiny_config.train.update(max_steps=40, resume=True)  # ... then continue to 40.
  records = _run(tiny_config, str(tmp_path / 'resumed'))
  resumed = _step_losses(records)
  # It restarted at the saved step 20: the resume event, then step 21 is the first step it logged.
  events = [r for r in records if r.get('event') == 'resume']
  assert [e['step'] for e in events] == [20]
  after = records[records.index(events[0]) + 1:]
  assert [r['step'] for r in after if r['step'] in _step_losses(after)][0] == 21
  assert sorted(resumed) == sorted(straight)
  for s in straight:
    assert resumed[s] == straight[s], f'step {s}: {resumed[s]} != {straight[s]}'


def _run(config, out_dir):
  config.out_dir = out_dir
  loop_lib.train_and_evaluate(config)
  return _read_metrics(out_dir)


@pytest.mark.slow
def test_fresh_run_refuses_to_overwrite_existing_checkpoints(tiny_config):
  tiny_config.train.max_steps = 10
  loop_lib.train_and_evaluate(tiny_config)
  with pytest.raises(UserError, match='already holds checkpoints.*resume'):
    loop_lib.train_and_evaluate(tiny_config)


def test_resume_without_checkpoint_is_a_user_error(tiny_config):
  tiny_config.train.resume = True
  with pytest.raises(UserError, match='no checkpoint'):
    loop_lib.train_and_evaluate(tiny_config)


@pytest.mark.slow
def test_resume_with_a_different_model_names_the_mismatch(tiny_config):
  tiny_config.train.max_steps = 10
  loop_lib.train_and_evaluate(tiny_config)
  tiny_config.model.n_embd = 48
  tiny_config.train.update(resume=True, max_steps=20)
  with pytest.raises(UserError, match=r'n_embd: checkpoint 32, config 48'):
    loop_lib.train_and_evaluate(tiny_config)


@pytest.mark.slow
def test_divergence_stops_without_touching_the_good_checkpoint(tiny_config, tmp_path):
  tiny_config.train.update(max_steps=20, eval_interval=10, log_interval=1)
  tiny_config.checkpoint.save = 'always'
  loop_lib.train_and_evaluate(tiny_config)
  ckpt_dir = tmp_path / 'out' / 'checkpoints'
  # Keyed by path relative to the directory: every step holds files of the same base names.
  before = {str(p.relative_to(ckpt_dir)): p.stat().st_mtime_ns for p in ckpt_dir.rglob('*')}
  # Continue with an absurd learning rate: the loss becomes NaN/Inf.
  tiny_config.train.update(resume=True, max_steps=40, learning_rate=1e6, min_learning_rate=1e6)
  with pytest.raises(UserError, match='diverged.*step 20.*untouched'):
    loop_lib.train_and_evaluate(tiny_config)
  after = {str(p.relative_to(ckpt_dir)): p.stat().st_mtime_ns for p in ckpt_dir.rglob('*')}
  assert after == before and any(k.startswith('20/') for k in before)


@pytest.mark.slow
@pytest.mark.parametrize('save', ['best', 'always'])
def test_a_nan_val_loss_alone_stops_the_run_without_a_checkpoint(tiny_config, monkeypatch, save):
  # Only the val loss of the third eval (step 20) is NaN; every train loss stays finite, so it is the
  # val-loss guard, not the train-loss one, that must stop the run before step 20 is saved.
  tiny_config.train.update(max_steps=30, eval_interval=10, log_interval=1)
  tiny_config.checkpoint.save = save
  real, calls = evaluator_lib.Evaluator.split_loss, []

  def split_loss(self, params, split):
    calls.append(split)
    return math.nan if split == 'val' and calls.count('val') == 3 else real(self, params, split)

  monkeypatch.setattr(evaluator_lib.Evaluator, 'split_loss', split_loss)
  with pytest.raises(UserError, match=r'the validation loss is nan at step 20: training diverged.*'
                                      r'last good checkpoint \(step 10\) is untouched'):
    loop_lib.train_and_evaluate(tiny_config)
  ckpt = checkpoint_lib.Checkpointer(f'{tiny_config.out_dir}/checkpoints', tiny_config.checkpoint)
  assert ckpt.steps() == [10]
  ckpt.close()
  recs = _read_metrics(tiny_config.out_dir)
  assert all(math.isfinite(r['train_loss']) for r in recs if 'train_loss' in r)
  assert max(r['step'] for r in recs) == 20


@pytest.mark.slow
def test_target_is_reached_when_the_val_loss_equals_it(tiny_config, monkeypatch):
  # "At or under": a val loss exactly at the target reaches it (a `<` would wait for the next eval).
  tiny_config.train.update(max_steps=3, eval_interval=1, log_interval=1, target_val_loss=2.5)
  tiny_config.sample.eval_tokens = 0
  vals = iter([3.0, 2.5, 2.5, 2.0])
  # split_loss returns the sum over the eval batches, which the evaluator divides by their number.
  monkeypatch.setattr(evaluator_lib.Evaluator, 'split_loss',
                      lambda self, params, split: (next(vals) if split == 'val' else 3.0) * self.eval_iters)
  summary = loop_lib.train_and_evaluate(tiny_config)
  assert summary['target_reached']['step'] == 1 and summary['target_reached']['val_loss'] == 2.5
  reached = [r for r in _read_metrics(tiny_config.out_dir) if r.get('event') == 'target_reached']
  assert [r['step'] for r in reached] == [1]


@pytest.mark.slow
def test_without_eval_at_start_the_first_eval_comes_after_eval_interval_steps(tiny_config,
                                                                                monkeypatch):
  tiny_config.train.update(max_steps=20, eval_interval=10, log_interval=5, eval_at_start=False,
                           target_val_loss=3.0)
  tiny_config.sample.eval_tokens = 0
  vals = iter([3.0, 2.0])  # A third eval would raise StopIteration.
  monkeypatch.setattr(evaluator_lib.Evaluator, 'split_loss',
                      lambda self, params, split: (next(vals) if split == 'val' else 3.5) * self.eval_iters)
  summary = loop_lib.train_and_evaluate(tiny_config)
  assert [r['step'] for r in _read_metrics(tiny_config.out_dir) if 'val_loss' in r] == [10, 20]
  assert summary['target_reached']['step'] == 10 and summary['best_val_loss'] == 2.0
  ckpt = checkpoint_lib.Checkpointer(f'{tiny_config.out_dir}/checkpoints', tiny_config.checkpoint)
  assert ckpt.steps() == [10, 20] and ckpt.best_step() == 20
  ckpt.close()


class _Clock:
  """loop.py's `time` module with a wall clock that advances 1 s per reading: time counted by calls."""

  def __init__(self, now: float):
    self.now = now
    self.perf_counter = __import__('time').perf_counter

  def time(self) -> float:
    self.now += 1.0
    return self.now


@pytest.mark.slow
def test_a_resumed_run_keeps_its_clock_and_reaches_the_target_once(tiny_config, monkeypatch):
  clock = _Clock(1000.0)
  monkeypatch.setattr(loop_lib, 'time', clock)
  vals = iter([4.0, 3.0, 2.9, 2.8, 2.7])  # Evals at 0, 10, 20, then (resumed) 30, 40.
  monkeypatch.setattr(evaluator_lib.Evaluator, 'split_loss',  # A sum over the eval batches, as the real one.
                      lambda self, params, split: (next(vals) if split == 'val' else 3.5) * self.eval_iters)
  tiny_config.train.update(max_steps=20, eval_interval=10, log_interval=5, target_val_loss=3.0)
  tiny_config.checkpoint.save = 'always'
  tiny_config.sample.eval_tokens = 0
  first = loop_lib.train_and_evaluate(tiny_config)
  assert first['target_reached']['step'] == 10
  at_checkpoint = max(r['time'] for r in _read_metrics(tiny_config.out_dir) if 'time' in r)

  clock.now += 1e6  # The run lay idle before it was resumed: that time is not the run's.
  tiny_config.train.update(resume=True, max_steps=40)
  second = loop_lib.train_and_evaluate(tiny_config)
  recs = _read_metrics(tiny_config.out_dir)
  assert [r['step'] for r in recs if r.get('event') == 'target_reached'] == [10]
  assert second['target_reached'] == first['target_reached']
  resumed = recs[[r.get('event') for r in recs].index('resume') + 1:]
  times = [r['time'] for r in resumed if 'time' in r]
  assert times and at_checkpoint < min(times) and max(times) < at_checkpoint + 1000
  assert first['wall_seconds'] < second['wall_seconds'] < first['wall_seconds'] + 1000


def test_every_config_problem_is_reported_in_one_message(tiny_config):
  t = tiny_config.train
  t.update(batch_size=0, max_steps=0, eval_interval=0, eval_iters=0, log_interval=0, grad_accum_steps=0,
           target_val_loss=-1.0, learning_rate=0.0, optimizer='sgd', seed=-1)
  tiny_config.data.shards_dir = '/nowhere'  # Only the seed's check reads it: nothing is opened.
  tiny_config.checkpoint.save = 'sometimes'
  with pytest.raises(UserError) as e:
    loop_lib.train_and_evaluate(tiny_config)
  problems = str(e.value).removeprefix('invalid config: ').split('; ')
  assert problems == [
      *(f'train.{k} must be >= 1 (got 0)' for k in ('batch_size', 'max_steps', 'eval_interval',
                                                   'eval_iters', 'log_interval', 'grad_accum_steps')),
      'train.target_val_loss must be >= 0, 0 = none (got -1.0)',
      'train.learning_rate must be > 0 (got 0.0)',
      "train.optimizer must be one of ('adamw', 'adamw_by_hand', 'muon') (got 'sgd')",
      'train.seed must be >= 0 with data.shards_dir (got -1)',
      "checkpoint.save must be 'best' or 'always' (got 'sometimes')"]
  assert not pathlib.Path(tiny_config.out_dir).exists()  # Refused before anything is written.


@pytest.mark.parametrize('overrides,problem', [
    ({'optimizer': 'muon', 'muon_learning_rate': 0.0}, 'train.muon_learning_rate must be > 0 (got 0.0)'),
    ({'optimizer': 'muon', 'muon_ns_steps': 0}, 'train.muon_ns_steps must be >= 1 (got 0)'),
    ({'lr_schedule': 'step'}, "train.lr_schedule must be one of ('cosine', 'wsd') (got 'step')"),
    ({'lr_schedule': 'wsd', 'cooldown_fraction': 1.5}, 'train.cooldown_fraction must be in (0, 1] (got 1.5)'),
])
def test_each_optimizer_and_schedule_problem_is_named(tiny_config, overrides, problem):
  tiny_config.train.update(overrides)
  with pytest.raises(UserError) as e:
    loop_lib.train_and_evaluate(tiny_config)
  assert str(e.value) == f'invalid config: {problem}'


@pytest.mark.parametrize('max_steps,note', [(7_000, False), (8_000, True)])
def test_a_gpu_sized_run_on_a_cpu_is_told_how_long_it_would_take(max_steps, note):
  from ml_collections import ConfigDict

  from gpt_jax.training import metrics as metrics_lib
  lines = []
  # 1.2 s/step from step 1000: 7,200 s left (two hours exactly: no note) or 8,400 s (2.3 h: the note).
  metrics_lib.report_expected_time(lines.append, 1.2, ConfigDict({'max_steps': max_steps}), 1000)
  assert lines[0].startswith('1200 ms/step: expect about')
  assert jax.default_backend() == 'cpu'
  assert (len(lines) == 2) == note
  if note:
    assert lines[1].startswith('note: this preset would take about 2.3 h on this CPU; it is sized for a '
                               'GPU') and 'configs/shakespeare.py:speedrun' in lines[1]


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_and_names_the_checkpoint_to_continue_from(tiny_config,
                                                                                 monkeypatch):
  tiny_config.train.update(max_steps=30, eval_interval=10, log_interval=1)
  tiny_config.checkpoint.save = 'always'
  real = loop_lib.Trainer.train_one_step

  def train_one_step(self):
    if self.step == 15:  # As the StopRequest handler does on a second SIGINT.
      raise KeyboardInterrupt
    real(self)
  monkeypatch.setattr(loop_lib.Trainer, 'train_one_step', train_one_step)
  with pytest.raises(UserError, match=r'^interrupted at step 15\. Continue from checkpoint 10 with '
                                      r'--config\.train\.resume=True\.$'):
    loop_lib.train_and_evaluate(tiny_config)
  ckpt = checkpoint_lib.Checkpointer(f'{tiny_config.out_dir}/checkpoints', tiny_config.checkpoint)
  assert ckpt.steps() == [10]  # No checkpoint of the interrupted step.
  ckpt.close()


@pytest.mark.parametrize('key,value,match', [
    ('batch_size', 0, 'train.batch_size'),
    ('learning_rate', -1.0, 'learning_rate'),
])
def test_invalid_train_values(tiny_config, key, value, match):
  tiny_config.train[key] = value
  with pytest.raises(UserError, match=match):
    loop_lib.train_and_evaluate(tiny_config)


def test_flops_per_token_matches_nanogpt_formula():
  cfg = ModelConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384)
  from gpt_jax.config import num_params
  n = num_params(cfg, non_embedding=True)
  assert config_lib.flops_per_token(cfg) == 6 * n + 12 * 6 * 384 * 256


@pytest.mark.slow
def test_remat_computes_the_same_steps():
  """Rematerialisation only changes what is stored for the backward pass, not what is computed."""
  data = jnp.asarray(np.random.RandomState(3).randint(0, 20, 3000), jnp.uint16)
  runs = {}
  for remat in (False, True):
    model_cfg, train_cfg = _setup(dict(dropout=0.1, remat=remat))
    state, step = step_lib.init_train_state(model_cfg, train_cfg), _step_fn(model_cfg, train_cfg, 4, 1)
    losses = []
    for _ in range(5):
      state, m = step(state, data)
      losses.append(float(m['loss']))
    runs[remat] = (losses, state.params)
  np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(runs[True][1]), jax.tree_util.tree_leaves(runs[False][1])):
    np.testing.assert_allclose(a, b, atol=1e-6)


MIXED_PRECISION_DATA = jnp.asarray((np.arange(3000) * 7) % 20, jnp.uint16)  # Each token fixes the next.


@functools.cache  # The float32 curve is shared by both 16-bit cases (same program, same numbers).
def _mixed_precision_curve(dt: str):
  """40 steps computed in `dt`: (losses, the dtypes of the loss and grad norm, of the state's arrays,
  the model config, the final parameters)."""
  model_cfg, train_cfg = _setup(dict(dtype=dt), learning_rate=3e-3, warmup_steps=5)
  state, step = step_lib.init_train_state(model_cfg, train_cfg), _step_fn(model_cfg, train_cfg, 8, 1)
  losses = []
  for _ in range(40):
    state, m = step(state, MIXED_PRECISION_DATA)
    losses.append(float(m['loss']))
  state_dtypes = {a.dtype for a in jax.tree_util.tree_leaves((state.params, state.opt_state))
                  if hasattr(a, 'dtype') and a.ndim}
  return np.array(losses), (m['loss'].dtype, m['grad_norm'].dtype), state_dtypes, model_cfg, state.params


@pytest.mark.slow
@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_mixed_precision_keeps_float32_state_and_tracks_float32(dtype):
  """Compute in 16 bits; parameters, optimizer state, gradients and the loss stay float32."""
  curves = {}
  for dt in ('float32', dtype):
    curves[dt], metric_dtypes, state_dtypes, model_cfg, params = _mixed_precision_curve(dt)
    assert metric_dtypes == (jnp.float32, jnp.float32)
    assert state_dtypes == {jnp.dtype(jnp.float32)}
  # As under torch.autocast, the residual stream stays float32 while the matmuls are 16-bit (their
  # operands are checked in tests/test_gpu_path.py and tests/test_lower_cuda.py). XLA:CPU may keep
  # excess precision between ops, so the curves can be even closer here than on a GPU.
  model = GPT(ModelConfig(**dict(model_cfg.to_dict(), dtype=dtype)))
  # Only the dtype is checked: eval_shape traces the model without running it.
  _, inter = jax.eval_shape(lambda p: model.apply({'params': p}, MIXED_PRECISION_DATA[None, :16].astype(jnp.int32),
                                                  mutable='intermediates'), params)
  assert inter['intermediates']['h_0']['resid'][0].dtype == jnp.float32
  # The same curve within 16-bit rounding: losses fall (3.0 -> ~1.1 here) and differ by less than
  # half the dtype's epsilon (bfloat16 2e-3, float16 2.4e-4); a loss or softmax computed in 16 bits
  # would be off by several epsilons.
  assert curves[dtype][-1] < curves[dtype][0] - 0.3
  diff = np.abs(curves[dtype] - curves["float32"]).max()
  print(f"{dtype}: loss {curves[dtype][0]:.3f} -> {curves[dtype][-1]:.3f}, max |diff| vs float32 {diff:.2e}")
  assert diff < 0.5 * float(jnp.finfo(dtype).eps)


def test_accurate_mean_is_near_correctly_rounded_and_keeps_the_gradient():
  """The loss's mean over B*T tokens: ~0.3 ulp from float64 where jnp.mean is ~1 ulp; same gradient."""
  rng = np.random.default_rng(0)
  ours, plain = [], []
  for _ in range(100):
    v = (2.5 + 0.8 * rng.normal(size=768)).astype(np.float32)
    exact = v.astype(np.float64).mean()
    ours.append(abs(float(jax.jit(step_lib.accurate_mean)(v)) - exact))
    plain.append(abs(float(jax.jit(jnp.mean)(v)) - exact))
  ulp = float(np.spacing(np.float32(2.5)))
  print(f'mean error in ulp: accurate_mean {np.mean(ours) / ulp:.2f}, jnp.mean {np.mean(plain) / ulp:.2f}')
  assert np.mean(ours) < 0.5 * ulp and np.mean(ours) < 0.75 * np.mean(plain)
  g = jax.grad(step_lib.accurate_mean)(jnp.asarray(v))
  np.testing.assert_array_equal(np.asarray(g), np.asarray(jax.grad(jnp.mean)(jnp.asarray(v))))


def test_the_training_package_needs_neither_torch_nor_matplotlib():
  """The core stays light: the trainer imports no tooling (PyTorch reference, plots)."""
  import subprocess
  import sys
  code = ('import sys, gpt_jax.training.loop, gpt_jax.training.step; '
          'bad = [m for m in ("torch", "matplotlib") if m in sys.modules]; '
          'assert not bad, bad')
  r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                     cwd=str(__import__('pathlib').Path(__file__).resolve().parents[2]))
  assert r.returncode == 0, r.stderr
