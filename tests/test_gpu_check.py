"""scripts/gpu_check.sh: the one-command GPU check, gone through with --dry_run on this CPU."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import load_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_environment_names_what_is_missing(monkeypatch):
  gc = load_script('gpu_check')
  real = gc.version
  monkeypatch.setattr(gc, 'version', lambda name: None if name == 'ml_collections' else real(name))
  info = gc.environment(type('Args', (), {'dry_run': True, 'no_install': True})())
  assert not info['ok'] and info['ml_collections'] is None
  assert info['problems'] == ['missing packages: ml_collections (pip install ml_collections)']


def _has_gpu_tests(path: pathlib.Path) -> bool:
  """Whether a test module marks anything `gpu` (decorators or `pytestmark`; not text in strings)."""
  tree = ast.parse(path.read_text(encoding='utf-8'))
  return any(isinstance(node, ast.Attribute) and node.attr == 'gpu' and ast.unparse(node) == 'pytest.mark.gpu'
             for node in ast.walk(tree))


def test_gpu_tests_stage_runs_every_file_with_a_gpu_test():
  """The stage runs GPU_TESTS only (the whole tree needs the dev requirements): none may be missing."""
  gc = load_script('gpu_check')
  marked = {str(p.relative_to(REPO)) for p in sorted((pathlib.Path(REPO) / 'tests').rglob('*.py'))
            if _has_gpu_tests(p)}
  assert marked >= {'tests/gpu/test_gpu_tier.py', 'tests/test_lower_cuda.py'}
  assert all(any(m == g or m.startswith(g + '/') for g in gc.GPU_TESTS) for m in marked), marked


def test_every_key_the_check_passes_is_in_the_run_config():
  """A setting the sweep passes (--config.SECTION.FIELD=...) must name a field the run config has."""
  from gpt_jax.config_files import load_config_file
  gc = load_script('gpu_check')
  config = load_config_file(os.path.join(REPO, 'configs', 'gpt2.py'))
  keys = {o[len('--config.'):].split('=', 1)[0] for s in gc.GPT2_SETTINGS.values() for o in s}
  keys.add('train.compilation_cache_dir')  # What `cache` passes to every timed run.
  assert 'train.steps_per_call' in keys
  for key in sorted(keys):
    section, field = key.split('.')
    assert field in config[section], key


def test_budget_fits_ten_minutes_and_names_every_stage():
  gc = load_script('gpu_check')
  plan = gc.budget(list(gc.GPT2_DEFAULT))
  assert set(plan) | {'step_gpu'} == set(gc.STAGES) and sum(plan.values()) <= 600, plan
  assert set(gc.TARGETS) <= set(gc.STAGES) and set(gc.GPT2_DEFAULT) <= set(gc.GPT2_SETTINGS)


def test_judge_marks_each_target():
  gc = load_script('gpu_check')
  res = {'wall_seconds': 21.0, 'full_pass_val_loss': 1.465}
  gc.judge('gpu_speedrun_warm', res, dry_run=False)
  assert [t['met'] for t in res['targets']] == [False, True]
  gc.judge('gpu_speedrun_warm', res, dry_run=True)  # Tiny sizes: reported, not judged.
  assert [t['met'] for t in res['targets']] == [None, None]
  res = {'best_tokens_per_s': None}  # A sweep where nothing ran misses its target.
  gc.judge('step_gpt2_best', res, dry_run=False)
  assert res['targets'][0]['met'] is False


def test_run_figures_prefer_the_startup_record(tmp_path):
  gc = load_script('gpu_check')
  log = tmp_path / 'run.log'
  log.write_text('compiled and ran the first step in 3.4s\n')
  records = [{'step': 5, 'train_loss': 3.0, 'ms_per_step': 9.0, 'tokens_per_s': 10.0, 'mfu': 0.1, 'time': 1.0},
             {'step': 10, 'train_loss': 2.5, 'ms_per_step': 4.0, 'tokens_per_s': 20.0, 'mfu': 0.2, 'time': 2.0},
             {'step': 10, 'train_loss': 2.4, 'val_loss': 1.46, 'time': 2.5},
             {'event': 'target_reached', 'step': 10, 'time': 2.5, 'target_val_loss': 1.47}]
  got = gc.run_figures(records, str(log))
  assert got['first_step_seconds'] == 3.4 and got['first_step_from'].startswith('log')
  assert got['ms_per_step'] == 4.0 and got['seconds_to_target'] == 2.5 and got['final_val_loss'] == 1.46
  got = gc.run_figures([{'event': 'startup', gc.STARTUP_FIRST_STEP: 7.5}, *records], str(log))
  assert got['first_step_seconds'] == 7.5 and got['first_step_from'] == 'startup record'
  other = [dict(r, train_loss=2.5000001) if r.get('step') == 5 else r for r in records]
  assert gc.trajectory(records) != gc.trajectory(other)
  assert gc.first_difference(gc.trajectory(records), gc.trajectory(other))[0][0] == 5


@pytest.mark.slow
def test_dry_run_goes_through_every_stage(tmp_path):
  out = tmp_path / 'check'
  # One GPT-2 setting runs (the others take the same path); one needing a key not yet in the config
  # is skipped, saying so.
  settings = 'b32,b32_spc4'
  proc = subprocess.run(['bash', os.path.join(REPO, 'scripts', 'gpu_check.sh'), '--dry_run',
                         '--out', str(out), '--gpt2_settings', settings],
                        env=dict(os.environ, PYTHON=sys.executable),
                        capture_output=True, text=True, check=False, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads((out / 'gpu_check.json').read_text())
  gc = load_script('gpu_check')
  assert result['dry_run'] is True and all(result[s]['ok'] for s in gc.STAGES)
  assert result['train']['preset'] == 'tiny' and result['train']['full_pass_val_loss'] > 0
  assert result['step_gpu']['tokens_per_s'] > 0
  assert 'skipped' in result['gpu_tests']['summary']  # No GPU here: the tier skips, as allowed.
  for name in ('gpu_speedrun_cold', 'gpu_speedrun_warm'):
    r = result[name]
    assert r['wall_seconds'] > 0 and r['first_step_seconds'] > 0 and r['full_pass_val_loss'] > 0
    # The kept checkpoint is the run's last (and only) eval: evaluate.py's full pass repeats it.
    assert abs(r['full_pass_val_loss'] - r['final_val_loss']) < 1e-3
    assert all(t['met'] is None for t in r['targets'])
  seeds = result['gpu_speedrun_seeds']
  assert set(seeds['val_loss_by_seed']) == {'1337', '2', '3'} and len(set(seeds['val_loss_by_seed'].values())) == 3
  det = result['deterministic']
  # On a CPU two runs of one config are bit for bit the same, with the flag and without.
  assert det['bit_identical'] is True and det['without_flag_bit_identical'] is True
  assert det['compared_records'] >= 3 and gc.DETERMINISTIC_FLAG in det['xla_flags'] and det['ms_per_step'] > 0
  sweep = result['step_gpt2_best']
  ran = {n: s['tokens_per_s'] for n, s in sweep['settings'].items() if 'skipped' not in s}
  assert 'b32' in ran and sweep['best_tokens_per_s'] == max(ran.values()) == ran[sweep['best']] > 0
  assert 'skipped' not in sweep['settings']['b32_spc4']
  table = proc.stdout[proc.stdout.index('stage '):]
  assert all(s in table for s in gc.STAGES) and 'not judged' in table
  assert f'total {sum(gc.budget(settings.split(",")).values())} ' in proc.stdout  # The budget, printed.
