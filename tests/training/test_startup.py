"""Start-up (gpt_jax/training/startup.py): the train step compiled in a background thread is the very
program of the sequential start-up, an error there reaches the main thread, and a second run with
train.compilation_cache_dir loads every program from the cache."""

import json
import threading
import time
import traceback

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gpt_jax import config_checks
from gpt_jax.data import batches as batches_lib
from gpt_jax.errors import UserError
from gpt_jax.parallel import mesh as mesh_lib
from gpt_jax.training import loop as loop_lib, multi_step, startup


def _records(out_dir):
  with open(f'{out_dir}/metrics.jsonl', encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _short(config, out_dir):
  """A few logged steps of the tiny model, with the step-0 eval and a short sample."""
  config.out_dir = str(out_dir)
  config.train.update(max_steps=3, log_interval=1, eval_interval=100, eval_iters=2)
  config.sample.eval_tokens = 0  # The sampler's compilation is not what these tests are about.
  return config


def test_background_compile_is_the_sequential_program_and_the_cache_serves_a_rerun(
    tiny_config, tmp_path, monkeypatch):
  cache = tmp_path / 'jax_cache'
  tiny_config.train.compilation_cache_dir = str(cache)
  loop_lib.train_and_evaluate(_short(tiny_config, tmp_path / 'overlapped'))
  monkeypatch.setenv(startup.SWITCH, 'sequential')  # As the loop did before: compile on the first call.
  loop_lib.train_and_evaluate(_short(tiny_config, tmp_path / 'sequential'))

  runs = {name: _records(tmp_path / name) for name in ('overlapped', 'sequential')}
  first, second = ([r for r in runs[name] if r.get('event') == 'startup'] for name in runs)
  assert len(first) == len(second) == 1 and first[0]['step'] == 1
  first, second = first[0], second[0]
  assert first['background_compile'] and not second['background_compile']
  assert first['first_step_seconds'] >= first['eval_seconds'] > 0 and first['step_compile_seconds'] > 0
  # A fresh cache: everything compiled, and written to it (every program, however fast).
  assert first['programs'] > 0 and first['programs_from_cache'] == 0 and first['step_from_cache'] is False
  assert any(cache.iterdir())
  # The rerun loads every program it needs, the train step too: the jit call found the entry the
  # background thread wrote, so the two compiled the same program (the cache key hashes it) ...
  assert second['programs'] > 0 and second['programs_from_cache'] == second['programs']
  assert second['step_from_cache'] is True
  # ... and it trains the same, bit for bit.
  losses = {name: [(r['step'], r['train_loss']) for r in recs if 'ms_per_step' in r or 'val_loss' in r]
            for name, recs in runs.items()}
  assert len(losses['overlapped']) == 5 and losses['overlapped'] == losses['sequential']


def test_an_error_in_the_background_compile_is_raised_in_the_main_thread(tiny_config, tmp_path,
                                                                           monkeypatch):
  def broken_step(*args, **kwargs):
    raise ValueError('the train step cannot be traced: made up for this test')

  monkeypatch.setattr(loop_lib, 'train_step', broken_step)
  config = _short(tiny_config, tmp_path / 'out')
  config.train.eval_at_start = False  # Nothing else traces before the first step.
  with pytest.raises(ValueError, match='made up for this test') as raised:
    loop_lib.train_and_evaluate(config)
  frames = [f.name for f in traceback.extract_tb(raised.value.__traceback__)]
  assert '_compile_all' in frames and 'train_one_step' in frames  # Raised there, surfaced here.


def test_compilation_cache_dir_must_be_a_writable_folder(tmp_path):
  (tmp_path / 'a_file').write_text('x', encoding='utf-8')
  assert config_checks.check_cache_dir('') == []
  assert config_checks.check_cache_dir(str(tmp_path / 'new' / 'cache')) == []  # Made when used.
  problems = config_checks.check_cache_dir(str(tmp_path / 'a_file' / 'cache'))
  assert len(problems) == 1 and 'not a folder' in problems[0]
  assert config_checks.check_cache_dir(None) != []


def _slow_step(state, data, layer_stats=False):
  """A train step whose tracing takes a while, so that its first call is due before it is compiled;
  its layer-statistics variant cannot be compiled at all."""
  time.sleep(0.5)
  if layer_stats:
    raise UserError('cannot compile: made up for this test')
  return state * 2.0, {'loss': data.sum()}


def test_the_first_call_waits_for_the_compilation_and_gets_its_error():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp'))
  source = batches_lib.ResidentBatches({'train': np.arange(64, dtype=np.uint16)}, 4, 2, 1, mesh)
  rep = mesh_lib.replicated(mesh)
  steps = multi_step.Steps(_slow_step, 1, source, mesh, (rep, rep))
  t = ml_collections.ConfigDict(dict(max_steps=3, steps_per_call=1, layer_stats_interval=2))
  s = startup.Startup(time.time())
  state = mesh_lib.put_replicated(np.ones(3, np.float32), mesh)
  s.compile(steps, jax.ShapeDtypeStruct((3,), jnp.float32), t, first_step=0)
  assert set(steps.pending) == {(1, False), (1, True)}  # Compiling: each call waits for its own.
  got = []  # A wait that never ends fails the test instead of hanging the suite.
  caller = threading.Thread(target=lambda: got.append(steps(state, 0, 1)), daemon=True)
  caller.start()
  caller.join(timeout=60)
  assert got, 'the wait for the background compilation never ended'
  np.testing.assert_array_equal(got[0][0], [2.0, 2.0, 2.0])
  assert s.first_key == (1, False) and s.waited > 0.1 and s.seconds[(1, False)] >= 0.5
  assert isinstance(steps.calls[1, False], jax.stages.Compiled)  # What the thread compiled.
  with pytest.raises(UserError, match='cannot compile: made up for this test'):
    steps.call(1, layer_stats=True)
