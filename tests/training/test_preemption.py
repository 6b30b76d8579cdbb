"""Preemption safety: signals stop a run at a checkpoint that resumes exactly; one writer per run
directory; a full disk; damaged checkpoints. Signals and locks are tested on real subprocesses of
scripts/train.py; the multi-process agreement is in tests/parallel/test_multihost.py."""

import errno
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from train_procs import (  # Shared with test_chaos.py.
  REPO,
  TRAIN,
  Run,
  garble_meta as _garble_meta,
  garble_metrics as _garble_metrics,
  metrics as _metrics,
  train_flags as _flags,
  truncate_largest_array as _truncate_largest_array,
)

from gpt_jax import checkpoint as checkpoint_lib, checkpoint_damage, sample_run
from gpt_jax.errors import UserError
from gpt_jax.training import loop as loop_lib, preemption, run_setup, runlock

# 'best' mode, where the stop checkpoint is an extra one; accumulation and dropout, whose key streams
# a resumed run must continue.
RUN = ['--config.train.max_steps=30', '--config.train.eval_interval=10', '--config.train.log_interval=1',
       '--config.train.grad_accum_steps=2', '--config.train.eval_iters=20', '--config.model.dropout=0.1',
       '--config.checkpoint.save=best', '--config.sample.eval_tokens=0']

# scripts/train.py run as itself (its argv, so the printed resume command is train.py's), with the
# signal raised by the process at an exact point instead of sent from outside at a moment: the OS
# delivers it to the same handler, and no race with the machine's speed decides where it lands.
#   GPT_JAX_TEST_SIGNAL=SIGINT:step:7   during step 7 (after its update, before its log line)
#   GPT_JAX_TEST_SIGNAL=SIGTERM:eval:10 during the eval at step 10 (between its train and val halves)
SIGNALLING_TRAIN = '''
import os, runpy, signal, sys
from gpt_jax.training import evaluator, loop
name, where, at = os.environ['GPT_JAX_TEST_SIGNAL'].split(':')
sig, at = signal.Signals[name], int(at)
if where == 'step':
  log_step = loop.Trainer.log_step
  def hooked_log_step(self, metrics):
    if self.step == at:
      signal.raise_signal(sig)
    return log_step(self, metrics)
  loop.Trainer.log_step = hooked_log_step
else:
  call, split_loss = evaluator.Evaluator.__call__, evaluator.Evaluator.split_loss
  def hooked_call(self, params, step):
    self.at_step = step
    return call(self, params, step)
  def hooked_split_loss(self, params, split):
    if split == 'val' and self.at_step == at:
      signal.raise_signal(sig)
    return split_loss(self, params, split)
  evaluator.Evaluator.__call__, evaluator.Evaluator.split_loss = hooked_call, hooked_split_loss
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # As `python scripts/train.py` would.
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def _check_same_run(straight_dir, resumed_dir):
  """Interrupted + resumed == uninterrupted: every train step and eval once, bit for bit; same best."""
  a, b = _metrics(straight_dir), _metrics(resumed_dir)
  steps = lambda recs: [(r['step'], r['train_loss']) for r in recs if 'ms_per_step' in r]
  evals = lambda recs: [(r['step'], r['train_loss'], r['val_loss']) for r in recs if 'val_loss' in r]
  assert steps(b) == steps(a)  # Nothing re-run, nothing skipped, identical losses.
  assert evals(b) == evals(a)
  _, pa, ma = checkpoint_lib.load_for_inference(straight_dir)
  _, pb, mb = checkpoint_lib.load_for_inference(resumed_dir)
  assert mb['step'] == ma['step'] and mb['val_loss'] == ma['val_loss']
  for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """The uninterrupted run both signal tests must reproduce."""
  root = tmp_path_factory.mktemp('straight')
  from conftest import make_synthetic_text
  text = root / 'input.txt'
  text.write_text(make_synthetic_text(), encoding='utf-8')
  rc, out, err = Run(_flags(root, text, *RUN)).finish()
  assert rc == 0, out + err
  return root / 'out', text


def _interrupt_and_resume(tmp_path, text, sig, where):
  # GPT_JAX_ALLOCATOR=system: the malloc re-exec would start train.py afresh, without the hook.
  run = Run(None, cmd=[sys.executable, '-c', SIGNALLING_TRAIN, TRAIN, *_flags(tmp_path, text, *RUN)],
            env={'GPT_JAX_TEST_SIGNAL': f'{sig.name}:{where}', 'GPT_JAX_ALLOCATOR': 'system',
                 'PYTHONPATH': str(REPO)})
  rc, out, err = run.finish()
  assert rc == preemption.EX_TEMPFAIL == 75, out + err
  stop = [l for l in err.splitlines() if 'stopped at step' in l]
  assert len(stop) == 1 and 'Traceback' not in err, err
  m = re.match(rf'{sig.name}: stopped at step (\d+); checkpoint (\d+) is saved in (\S+)\. '
               r'Resume with: (.*)$', stop[0])
  assert m, stop[0]
  step = int(m.group(1))
  assert m.group(2) == str(step) and m.group(3) == str(tmp_path / 'out' / 'checkpoints')
  assert str(step) in os.listdir(tmp_path / 'out' / 'checkpoints')  # Finalised before the exit.
  assert _metrics(tmp_path / 'out')[-1] == {'event': 'stopped', 'step': step, 'signal': sig.name}
  cmd = shlex.split(m.group(4))
  assert cmd[-1] == '--config.train.resume=True' and cmd[1] == TRAIN
  rc, out, err = Run(None, cmd=[sys.executable, *cmd[1:]]).finish()  # The command, as printed.
  assert rc == 0, out + err
  assert f'resumed from step {step} ' in out
  return step


@pytest.mark.slow
def test_ctrl_c_mid_step_then_resume_equals_an_uninterrupted_run(tmp_path, straight):
  straight_dir, text = straight
  step = _interrupt_and_resume(tmp_path, text, signal.SIGINT, 'step:7')
  assert step == 7  # Between evals: a checkpoint 'best' mode would not write.
  _check_same_run(straight_dir, tmp_path / 'out')


@pytest.mark.slow
def test_sigterm_mid_eval_finishes_the_eval_then_resume_equals_an_uninterrupted_run(tmp_path,
                                                                                     straight):
  straight_dir, text = straight
  step = _interrupt_and_resume(tmp_path, text, signal.SIGTERM, 'eval:10')
  assert step == 10  # The eval finished, then the run stopped without another step.
  _check_same_run(straight_dir, tmp_path / 'out')


def test_one_cpu_device_bounds_the_steps_a_stop_waits_for():
  """On one CPU device too the loop syncs every CPU_MAX_STEPS_IN_FLIGHT steps: otherwise Python
  queues every step up to the next log line, and a stop request waits for all of them."""
  assert jax.default_backend() == 'cpu' and len(jax.devices()) == 1
  assert run_setup.dispatch_is_bounded()
  assert run_setup.CPU_MAX_STEPS_IN_FLIGHT <= preemption.SYNC_EVERY


def test_stop_request_flags_signals_and_restores_handlers():
  # signal.raise_signal delivers to this (the main) thread, whose Python handler then runs before the
  # next bytecode: no waiting on time, however loaded the machine.
  before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
  with preemption.StopRequest() as stop:
    assert not stop.should_stop(0)
    signal.raise_signal(signal.SIGTERM)
    assert stop.requested and stop.signal_name == 'SIGTERM' and stop.should_stop(3)
    signal.raise_signal(signal.SIGTERM)  # A repeated SIGTERM changes nothing ...
    assert stop.signal_name == 'SIGTERM'
    with pytest.raises(KeyboardInterrupt):  # ... a second Ctrl-C stops at once.
      signal.raise_signal(signal.SIGINT)
  assert {sig: signal.getsignal(sig) for sig in before} == before


def test_resume_command_replaces_the_resume_flag():
  cmd = preemption.resume_command(['scripts/train.py', '--config', 'c.py:cpu',
                                   '--config.train.resume=False', '--config.out_dir=a b'])
  assert cmd == "python scripts/train.py --config c.py:cpu '--config.out_dir=a b' " \
                '--config.train.resume=True'
  assert 'resume=True' in preemption.resume_command(['pytest'])


# --- one writer per run directory ------------------------------------------------------------------

@pytest.mark.slow
def test_second_run_is_refused_and_a_kill_9_leaves_no_stale_lock(tmp_path, synthetic_text_path):
  args = _flags(tmp_path, synthetic_text_path, '--config.train.max_steps=100000',
                '--config.train.eval_interval=5', '--config.train.eval_iters=2',
                '--config.checkpoint.save=always', '--config.sample.eval_tokens=0')
  first = Run(args)
  try:
    first.wait_for(r'saved checkpoint 5 ')
    rc, out, err = Run(args + ['--config.train.resume=True']).finish()
    assert rc == 1 and first.proc.poll() is None
    assert f'is in use by another training run (pid {first.proc.pid} on host ' in err, err
    assert 'model:' not in out and 'Traceback' not in err  # Refused before loading anything.
  finally:
    first.proc.kill()  # SIGKILL: no chance to unlock or to finish a save.
    first.finish()
  assert f'"pid": {first.proc.pid}' in (tmp_path / 'out' / runlock.LOCK_NAME).read_text()
  latest = max(int(n) for n in os.listdir(tmp_path / 'out' / 'checkpoints') if n.isdigit())
  rc, out, err = Run(args + ['--config.train.resume=True',
                             f'--config.train.max_steps={latest + 3}']).finish()
  assert rc == 0, out + err
  assert f'resumed from step {latest} ' in out
  assert not [n for n in os.listdir(tmp_path / 'out' / 'checkpoints') if 'tmp' in n]


def test_lock_is_exclusive_and_names_its_holder(tmp_path):
  fd = runlock.acquire(str(tmp_path))
  try:
    with pytest.raises(UserError, match=rf'in use by another training run \(pid {os.getpid()} on'):
      runlock.acquire(str(tmp_path))  # A second open file description conflicts, even in-process.
  finally:
    os.close(fd)
  os.close(runlock.acquire(str(tmp_path)))  # Free again once closed.


# --- a failing save ----------------------------------------------------------------------------------

def _small_run(config, steps=40):
  config.train.update(max_steps=steps, eval_interval=10, log_interval=5)
  config.checkpoint.update(save='always', keep_last=3)
  config.sample.eval_tokens = 0
  return config


def _mount_tmpfs(path, size):
  path.mkdir()
  r = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                     capture_output=True, text=True)
  return r.returncode == 0


def _wait_until_unchanged(path: pathlib.Path, quiet: float = 1.0, timeout: float = 30.0) -> None:
  """Waits until nothing under `path` has changed (names, sizes) for `quiet` seconds."""
  import time
  def snapshot():
    return sorted((str(p), p.stat().st_size if p.is_file() else -1) for p in path.rglob('*'))
  deadline, last, since = time.monotonic() + timeout, None, time.monotonic()
  while time.monotonic() < deadline:
    try:
      now = snapshot()
    except FileNotFoundError:  # A file renamed while listed: still changing.
      now = None
    if now != last:
      last, since = now, time.monotonic()
    elif time.monotonic() - since >= quiet:
      return
    time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['tmpfs', 'injected'])
# The failed background save's threads end with the same ENOSPC the run reports in its one line
# (asserted below); Python reports it again as an exception ignored in a thread.
@pytest.mark.filterwarnings('ignore:Exception ignored in. None:pytest.PytestUnraisableExceptionWarning')
def test_full_disk_stops_cleanly_and_the_earlier_checkpoints_resume(tiny_config, tmp_path,
                                                                    monkeypatch, kind):
  """A real full filesystem where this machine lets the test mount one (root: a 1 MB tmpfs holds one
  or two checkpoints of the tiny model); else, and always as `injected`, ENOSPC raised inside the
  background write of the second checkpoint, after Orbax has made its temporary step directory, as a
  full disk would."""
  disk = tmp_path / 'disk'
  mounted = _mount_tmpfs(disk, '1m') if kind == 'tmpfs' else disk.mkdir() and False
  if not mounted:
    from orbax.checkpoint._src.handlers import json_checkpoint_handler
    handler = json_checkpoint_handler.JsonCheckpointHandler
    real_write, steps = handler._save_fn, []

    async def failing_write(self, x, directory):  # Runs in the asynchronous commit.
      step = pathlib.Path(str(directory)).parent.name.split('.')[0]  # <step>.orbax-checkpoint-tmp/<item>
      if step not in steps:
        steps.append(step)
      if steps.index(step) == 1:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
      return await real_write(self, x, directory)
    monkeypatch.setattr(handler, '_save_fn', failing_write)
  try:
    config = _small_run(tiny_config)
    config.out_dir = str(disk / 'out')
    with pytest.raises(UserError) as e:
      loop_lib.train_and_evaluate(config)
    m = re.fullmatch(r'could not write checkpoint (\d+) to (\S+) \(no space left on device\); training '
                     r'stopped\. The earlier checkpoints \(([\d, ]+)\) are intact: free some space, then '
                     r'continue with --config\.train\.resume=True\.', str(e.value))
    assert m, str(e.value)
    failed, good = int(m.group(1)), [int(s) for s in m.group(3).split(', ')]
    assert failed > max(good) and failed % 10 == 0
    ckpt_dir = disk / 'out' / 'checkpoints'
    # The half-written step is no step: a fresh reader lists only the complete ones.
    assert checkpoint_lib.Checkpointer(str(ckpt_dir), read_only=True).steps() == good
    assert f'{failed}.orbax-checkpoint-tmp' in os.listdir(ckpt_dir)  # Orbax's unfinished folder.
    # The failed save's other items may still be written by Orbax's threads: in a script the process
    # exits here, but this test resumes in the same process, so let them settle first (else the
    # resumed save of the same step can race them for its temporary folder).
    _wait_until_unchanged(ckpt_dir / f'{failed}.orbax-checkpoint-tmp')
    if mounted:
      subprocess.run(['mount', '-o', 'remount,size=16m', str(disk)], check=True)  # Space freed.
    else:
      monkeypatch.undo()
    config.train.resume = True
    summary = loop_lib.train_and_evaluate(config)
    assert summary['start_step'] == max(good) and summary['final_step'] == 40
    steps = os.listdir(ckpt_dir)
    assert '40' in steps and not [n for n in steps if 'tmp' in n]  # Leftovers cleaned up.
  finally:
    if mounted:
      subprocess.run(['umount', str(disk)], check=True)


@pytest.mark.slow
def test_permission_denied_on_save_is_one_clear_message(tiny_config, monkeypatch):
  import orbax.checkpoint as ocp
  real_save = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step == 20:
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), f'/x/{step}')
    return real_save(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, 'save', save)
  config = _small_run(tiny_config, steps=20)
  with pytest.raises(UserError, match=r'checkpoint 20 .*\(permission denied\).*checkpoints \(10\) are '
                                      r'intact: make the directory writable'):
    loop_lib.train_and_evaluate(config)


# --- damaged checkpoints ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('damage', [_truncate_largest_array, _garble_meta, _garble_metrics])
def test_damaged_checkpoint_is_named_and_resume_can_continue_from_the_newest_good(tiny_config,
                                                                                   damage):
  config = _small_run(tiny_config, steps=20)
  loop_lib.train_and_evaluate(config)
  ckpt_dir = pathlib.Path(config.out_dir) / 'checkpoints'
  assert checkpoint_lib.Checkpointer(str(ckpt_dir), read_only=True).best_step() == 20
  damage(ckpt_dir / '20')
  files = {p: p.read_bytes() for p in (ckpt_dir / '20').rglob('*') if p.is_file()}

  with pytest.raises(UserError, match=r'checkpoint 20 in .* is damaged \(.+\)'):
    sample_run.sample_from_checkpoint(config.out_dir, max_new_tokens=2, verbose=False)
  config.train.update(resume=True, max_steps=30)
  with pytest.raises(UserError, match=r'checkpoint 20 in .* is damaged \(.+\); .*resume_from_last_good'
                     r'=True') as e:
    loop_lib.train_and_evaluate(config)
  assert '\n' not in str(e.value)
  if damage is not _garble_metrics:  # Orbax cannot even list the steps past a garbled metrics file.
    assert 'the newest good checkpoint is step 10' in str(e.value)
  assert {p: p.read_bytes() for p in (ckpt_dir / '20').rglob('*') if p.is_file()} == files

  config.train.resume_from_last_good = True
  summary = loop_lib.train_and_evaluate(config)
  assert summary['start_step'] == 10 and summary['final_step'] == 30
  moved = pathlib.Path(config.out_dir) / checkpoint_damage.DAMAGED_DIR / '20'
  assert {moved / p.relative_to(ckpt_dir / '20') for p in files} == {
      p for p in moved.rglob('*') if p.is_file()}  # Moved whole, not deleted.
  assert sorted(os.listdir(ckpt_dir)) == ['10', '20', '30']  # 20 written anew by the resumed run.


@pytest.mark.slow
def test_sample_script_names_the_damaged_step_in_one_line(tiny_config):
  config = _small_run(tiny_config, steps=20)
  loop_lib.train_and_evaluate(config)
  _truncate_largest_array(pathlib.Path(config.out_dir) / 'checkpoints' / '20')
  r = subprocess.run([sys.executable, str(REPO / 'scripts' / 'sample.py'),
                      f'--ckpt_dir={config.out_dir}', '--max_new_tokens=2'],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 1
  errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and re.search(r'checkpoint 20 in .* is damaged \(.+\); pick another with '
                                        r'--step \(available: \[10\]\)', errors[0]), r.stderr
  assert 'Traceback' not in r.stderr


def test_orbax_errors_come_one_line_each_and_closed_loop_noise_is_dropped():
  """What a full disk prints besides gpt_jax's own line (scripts only: gpt_jax/cli.py)."""
  import logging
  import types

  from gpt_jax import cli
  keep = cli._DropOrbaxChatter()
  rec = logging.LogRecord('absl', logging.ERROR, '/x/orbax/checkpoint/future.py', 1, 'failed: %s\nmore',
                          ('ENOSPC',), (ValueError, ValueError('v'), None))
  assert keep.filter(rec) and rec.getMessage() == 'failed: ENOSPC' and rec.exc_info is None
  assert not keep.filter(logging.LogRecord('absl', logging.WARNING, '/x/orbax/a.py', 1, 'w', (), None))
  ours = logging.LogRecord('absl', logging.ERROR, '/x/gpt_jax/a.py', 1, 'a\nb', (), None)
  assert keep.filter(ours) and ours.getMessage() == 'a\nb'
  seen = []
  hook = cli._without_closed_loop_noise(seen.append)
  for text in ('Event loop is closed', 'something else'):
    hook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError(text)))
  assert [str(u.exc_value) for u in seen] == ['something else']
