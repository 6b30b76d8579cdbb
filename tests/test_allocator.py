"""gpt_jax/allocator.py: the scripts re-execute once on mimalloc; the switch, the fallbacks, same losses."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from gpt_jax import allocator

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='LD_PRELOAD is Linux-only')

# A script as the entry points are: it logs each start of its interpreter, then calls preload().
PROBE = """
import json, os, sys
sys.path.insert(0, os.environ['PROBE_REPO'])
with open(os.environ['PROBE_LOG'], 'a') as f:
  f.write(f'{os.getpid()}\\n')
from gpt_jax import allocator
allocator.preload()
print(json.dumps({'pid': os.getpid(), 'argv': sys.argv[1:], 'stdin': sys.stdin.read(),
                  'malloc': allocator.loaded_allocator(),
                  'mimalloc_env': {k: os.environ.get(k) for k in allocator.MIMALLOC_ENV},
                  'purge_delay': os.environ.get(allocator.PURGE_VAR)}))
sys.exit(int(os.environ.get('PROBE_EXIT', '0')))
"""
_OURS = ('LD_PRELOAD', allocator.ENV_VAR, '_GPT_JAX_ALLOCATOR_PID', *allocator.MIMALLOC_ENV,
         allocator.PURGE_VAR)


def clean_env(**extra: str) -> dict:
  """This environment without any allocator setting (pytest itself may run preloaded)."""
  return {**{k: v for k, v in os.environ.items() if k not in _OURS}, **extra}


def mimalloc() -> str:
  lib = allocator.library_path()
  assert lib, 'cmeel-mimalloc is not installed: pip install -r requirements.txt'
  return lib


def run_probe(tmp_path, *args, env=None, stdin='', cmd_prefix=(), python_flags=()):
  probe, log = tmp_path / 'probe.py', tmp_path / 'starts.log'
  probe.write_text(PROBE)
  log.unlink(missing_ok=True)
  p = subprocess.Popen([*cmd_prefix, sys.executable, *python_flags, str(probe), *args],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       env={**(env or clean_env()), 'PROBE_LOG': str(log), 'PROBE_REPO': str(REPO)})
  out, err = p.communicate(stdin, timeout=120)
  return p, json.loads(out), err, log.read_text().split()


def test_script_runs_once_more_with_mimalloc_same_process_args_stdin_status(tmp_path):
  args = ['--flag=a b', 'ünï', '', '-']
  p, out, err, starts = run_probe(tmp_path, *args, stdin='line 1\nline 2\n',
                                  env=clean_env(PROBE_EXIT='3'), python_flags=['-u'])
  assert out['malloc'] == mimalloc(), err  # In the re-executed script's own /proc/self/maps.
  assert out['mimalloc_env'] == allocator.MIMALLOC_ENV and out['purge_delay'] is None
  assert starts == [str(p.pid)] * 2  # Two starts, one process: execve, not a child, and only once.
  assert out['argv'] == args and out['stdin'] == 'line 1\nline 2\n'
  assert p.returncode == 3 and err == ''


@pytest.mark.parametrize('args, purge_delay', [
    (['--config', 'configs/shakespeare.py:speedrun'], '-1'),       # The record's command: never purge.
    (['--config=configs/shakespeare.py:speedrun', '-x'], '-1'),
    (['--config', 'configs/shakespeare.py:speedrun_gpt2'], None),  # Every other preset: mimalloc's default.
    (['--config', 'configs/shakespeare.py'], None),
    (['configs/shakespeare.py:speedrun'], None),                   # Not a --config argument.
])
def test_the_speedrun_preset_never_purges_unless_the_user_says(tmp_path, args, purge_delay):
  p, out, err, starts = run_probe(tmp_path, *args)
  assert out['malloc'] == mimalloc() and out['purge_delay'] == purge_delay, err
  assert out['mimalloc_env'] == allocator.MIMALLOC_ENV and len(starts) == 2
  # A value in the environment wins (10 ms is mimalloc's own default).
  p, out, err, starts = run_probe(tmp_path, *args, env=clean_env(MIMALLOC_PURGE_DELAY='10'))
  assert out['malloc'] == mimalloc() and out['purge_delay'] == '10', err


def test_preset_of_reads_the_config_argument():
  assert allocator.preset_of(['--config', 'c.py:speedrun', '--config.train.seed=2']) == 'speedrun'
  assert allocator.preset_of(['--config=c.py:cpu']) == 'cpu'
  assert allocator.preset_of(['--config', 'c.py']) is None
  assert allocator.preset_of(['--config.train.seed=2']) is None and allocator.preset_of([]) is None
  assert allocator.mimalloc_env(['--config', 'c.py:speedrun']) == {
      **allocator.MIMALLOC_ENV, allocator.PURGE_VAR: '-1'}


@pytest.mark.parametrize('script', ['train', 'sample', 'evaluate', 'bench', 'compare_torch',
                                    'bench_devices'])
def test_entry_points_run_on_mimalloc(script):
  # MIMALLOC_VERBOSE makes mimalloc announce itself when it starts in a process.
  r = subprocess.run([sys.executable, str(REPO / 'scripts' / f'{script}.py'), '--help'],
                     capture_output=True, text=True, timeout=120,
                     env=clean_env(MIMALLOC_VERBOSE='1'))
  assert r.stderr.count('mimalloc: process init') == 1, r.stderr[-2000:]
  r = subprocess.run([sys.executable, str(REPO / 'scripts' / f'{script}.py'), '--help'],
                     capture_output=True, text=True, timeout=120,
                     env=clean_env(MIMALLOC_VERBOSE='1', GPT_JAX_ALLOCATOR='system'))
  assert 'mimalloc' not in r.stderr


def test_switch_turns_it_off(tmp_path):
  p, out, err, starts = run_probe(tmp_path, env=clean_env(GPT_JAX_ALLOCATOR='system'))
  assert out['malloc'] is None and starts == [str(p.pid)] and err == '' and p.returncode == 0


def test_missing_or_broken_library_falls_back_with_one_note(tmp_path):
  # -S: no site-packages, so the cmeel-mimalloc wheel is not found (as if never installed).
  p, out, err, starts = run_probe(tmp_path, 'x', python_flags=['-S'])
  assert out['malloc'] is None and starts == [str(p.pid)] and p.returncode == 0
  assert err.startswith('note: mimalloc is not installed') and err.count('\n') == 1

  broken = tmp_path / 'libbroken.so'
  broken.write_text('not a shared library')
  p, out, err, starts = run_probe(tmp_path, env=clean_env(GPT_JAX_ALLOCATOR=str(broken)))
  assert out['malloc'] is None and starts == [str(p.pid)] and p.returncode == 0
  assert err.startswith(f'note: cannot preload {broken}') and err.count('\n') == 1

  r = subprocess.run([sys.executable, str(tmp_path / 'probe.py')], capture_output=True, text=True,
                     env=clean_env(GPT_JAX_ALLOCATOR='tcmalloc', PROBE_LOG=str(tmp_path / 'l'),
                                   PROBE_REPO=str(REPO)))
  assert r.returncode == 1 and r.stderr.startswith('error: GPT_JAX_ALLOCATOR') and 'Traceback' not in r.stderr


def test_never_re_executes_twice(tmp_path):
  # A script started by a preloaded one inherits LD_PRELOAD: nothing to do.
  p, out, err, starts = run_probe(tmp_path, env=clean_env(LD_PRELOAD=mimalloc()))
  assert out['malloc'] == mimalloc() and starts == [str(p.pid)] and err == ''
  # The re-executed process (same pid) whose library did not get mapped: a note, no second exec.
  # The shell's pid survives its `exec`, so the probe sees the marker with its own pid.
  p, out, err, starts = run_probe(tmp_path, cmd_prefix=['sh', '-c', 'export _GPT_JAX_ALLOCATOR_PID=$$; exec "$@"', 'sh'])
  assert out['malloc'] is None and starts == [str(p.pid)] and p.returncode == 0
  assert err.startswith('note: the dynamic loader did not preload') and err.count('\n') == 1


@pytest.mark.slow  # Two JAX processes (import, compile): about 10 s of CPU.
def test_losses_are_bit_identical_with_and_without_mimalloc():
  cmd = [sys.executable, str(REPO / 'scripts' / 'bench_allocator.py'), '--child=tiny', '--steps=4',
         '--warmup=1']
  runs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
          for name, env in (('glibc', clean_env()),
                            ('mimalloc', clean_env(LD_PRELOAD=mimalloc(), **allocator.MIMALLOC_ENV)))}
  res = {}
  for name, p in runs.items():
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]
    res[name] = json.loads(out.split('CHILD_JSON ', 1)[1])
  assert res['glibc']['malloc'] is None and res['mimalloc']['malloc'] == mimalloc()
  assert len(res['glibc']['losses']) == 6 and len(set(res['glibc']['losses'])) == 6  # Training moved.
  assert res['mimalloc']['losses'] == res['glibc']['losses']
