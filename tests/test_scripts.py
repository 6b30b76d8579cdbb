"""The entry points, run as a user would (subprocesses): train -> sample, and clean error messages."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(script, *args, cwd=None, timeout=900, offline=False):
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  if offline:  # Any download would go through a proxy on a port where nothing listens.
    env.update({k: 'http://127.0.0.1:9' for k in ('http_proxy', 'https_proxy', 'HTTP_PROXY',
                                                    'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY')})
  return subprocess.run([sys.executable, str(REPO / 'scripts' / script), *args], cwd=cwd or REPO,
                        capture_output=True, text=True, timeout=timeout, env=env)


def tiny_flags(tmp_path, text_path, *extra):
  """The tiny preset; text_path None means no data flag at all (the shipped TinyShakespeare)."""
  return ['--config', str(REPO / 'configs' / 'shakespeare.py') + ':tiny',
          f'--config.out_dir={tmp_path / "out"}',
          *([f'--config.data.text_path={text_path}'] if text_path else []),
          f'--config.data.data_dir={tmp_path / "data"}', f'--config.data.cache_dir={tmp_path / "cache"}',
          '--config.train.peak_flops=1e12', *extra]


@pytest.mark.slow
def test_train_then_resume_then_sample_end_to_end(tmp_path):
  """A new user's first commands on an offline machine: no data flags, nothing downloaded."""
  r = run('train.py', *tiny_flags(tmp_path, None, '--config.train.max_steps=30'), offline=True)
  assert r.returncode == 0, r.stderr
  assert 'on cpu' in r.stdout and 'parameters' in r.stdout  # Backend, devices, model size.
  assert 'val loss' in r.stdout and 'sample:' in r.stdout and 'expect about' in r.stdout
  assert not (tmp_path / 'cache').exists() and 'downloading' not in r.stdout
  meta = json.loads((tmp_path / 'data' / 'meta.json').read_text())
  assert meta['vocab_size'] == 65 and meta['train_tokens'] == 1_003_854  # TinyShakespeare.
  latest = max(int(p.name) for p in (tmp_path / 'out' / 'checkpoints').iterdir() if p.name.isdigit())
  r = run('train.py', *tiny_flags(tmp_path, None, '--config.train.max_steps=50',
                                  '--config.train.resume=True'), offline=True)
  assert r.returncode == 0, r.stderr
  assert f'resumed from step {latest} ' in r.stdout  # The latest checkpoint, exactly.
  metrics = [json.loads(l) for l in (tmp_path / 'out' / 'metrics.jsonl').read_text().splitlines()]
  assert metrics[-1]['step'] == 50 and 'val_loss' in metrics[-1]
  assert json.loads((tmp_path / 'out' / 'config.json').read_text())['train']['max_steps'] == 50

  r = run('sample.py', f'--ckpt_dir={tmp_path / "out"}', '--prompt=ROMEO:', '--num_samples=2',
          '--max_new_tokens=40', '--seed=3')
  assert r.returncode == 0, r.stderr
  samples = r.stdout.split('---------- sample ')[1:]
  assert len(samples) == 2
  assert all(s.split('\n', 1)[1].startswith('ROMEO:') for s in samples)
  assert all(len(s.split('\n', 1)[1].rstrip('\n')) >= 46 for s in samples)

  prompt_file = tmp_path / 'prompt.txt'
  prompt_file.write_text('JULIET:\n', encoding='utf-8')
  r = run('sample.py', f'--ckpt_dir={tmp_path / "out"}', f'--prompt_file={prompt_file}',
          '--max_new_tokens=5', '--temperature=0')
  assert r.returncode == 0 and 'JULIET:\n' in r.stdout, r.stderr


@pytest.mark.slow
def test_prepare_data_script(tmp_path, synthetic_text_path):
  args = ['--config', str(REPO / 'configs' / 'shakespeare.py'),
          f'--config.data.text_path={synthetic_text_path}', f'--config.data.data_dir={tmp_path / "d"}']
  r = run('prepare_data.py', *args)
  assert r.returncode == 0 and 'prepared' in r.stdout, r.stderr
  r = run('prepare_data.py', *args)
  assert r.returncode == 0 and 'up to date' in r.stdout
  assert json.loads((tmp_path / 'd' / 'meta.json').read_text())['tokenizer'] == 'char'


@pytest.mark.parametrize('args,message', [
    (['--config.train.max_stepz=5'], 'there is no config field \'max_stepz\'. Did you mean "max_steps"'),
    (['--config.train.max_steps=abc'],
     "error: flag --config.train.max_steps=abc: invalid literal for int() with base 10: 'abc'"),
    (['--config.model.n_head=5'], 'n_embd (32) must be divisible by model.n_head (5)'),
    (['--config.data.text_path=/no/such/file.txt'], 'does not exist'),
])
def test_train_bad_input_gets_one_clear_message(tmp_path, synthetic_text_path, args, message):
  flags = tiny_flags(tmp_path, synthetic_text_path)
  if 'text_path' in args[0]:
    flags = [f for f in flags if 'text_path' not in f]
  r = run('train.py', *flags, *args)
  assert r.returncode != 0
  assert message in r.stderr
  assert 'Traceback' not in r.stderr + r.stdout


@pytest.mark.parametrize('config_arg,message', [
    ('configs/shakespeare.py:huge', "unknown preset 'huge'"),
    ('configs/nope.py', 'No such file'),
])
def test_bad_config_file_or_preset(config_arg, message):
  r = run('train.py', '--config', config_arg)
  assert r.returncode != 0 and message in r.stderr and 'Traceback' not in r.stderr


@pytest.mark.slow
def test_sample_bad_input_gets_one_clear_message(tmp_path, synthetic_text_path):
  r = run('sample.py', f'--ckpt_dir={tmp_path / "missing"}')
  assert r.returncode == 1 and 'no checkpoint directory' in r.stderr and 'Traceback' not in r.stderr
  r = run('train.py', *tiny_flags(tmp_path, synthetic_text_path, '--config.train.max_steps=5'))
  assert r.returncode == 0, r.stderr
  r = run('sample.py', f'--ckpt_dir={tmp_path / "out"}', '--prompt=Zebra€')
  assert r.returncode == 1 and "'€'" in r.stderr and 'Traceback' not in r.stderr
  r = run('sample.py', f'--ckpt_dir={tmp_path / "out"}', '--prompt_file=/no/such/prompt.txt')
  assert r.returncode == 1 and 'prompt_file' in r.stderr and 'Traceback' not in r.stderr
  # Flag-level checks (absl, before anything loads); the values' own checks are in test_refusals.py.
  for args, message in [([], '--ckpt_dir'), ([f'--ckpt_dir={tmp_path}', 'extra'], 'unexpected arguments'),
                        ([f'--ckpt_dir={tmp_path}', '--num_samples=abc'], 'num_samples')]:
    r = run('sample.py', *args)
    assert r.returncode != 0 and message in r.stderr and 'Traceback' not in r.stderr, (args, r.stderr)


@pytest.mark.slow
def test_every_script_answers_help_with_status_0():
  scripts = sorted(p.name for p in (REPO / 'scripts').glob('*.py') if p.name != '_bootstrap.py')
  assert 'train.py' in scripts and len(scripts) >= 10
  for name in scripts:
    r = run(name, '--help')
    assert r.returncode == 0 and 'Traceback' not in r.stderr, (name, r.stderr[-2000:])
    assert 'usage' in (r.stdout + r.stderr).lower() or '--' in r.stdout, name
