"""Training under chaos: one run of scripts/train.py, killed and stopped at moments that vary, its newest
checkpoint damaged twice and its token file cut short, a second run started on its directory, must end
exactly where an uninterrupted run ends, having deleted nothing and said each thing in one line.

The moments come from a seed, new at each run (GPT_JAX_CHAOS_SEED=N replays one); every failure
message names the seed and the moments. What is checked does not depend on them.
"""

import os
import random
import re
import shlex
import signal
import sys

import jax
import numpy as np
import pytest
from train_procs import TRAIN, Run, garble_meta, metrics, train_flags, truncate_largest_array

from gpt_jax import checkpoint as checkpoint_lib, checkpoint_damage
from gpt_jax.training import preemption

N = 120  # Steps of the whole run.
# The interrupted segments are started for far more steps, so that none can finish before its signal
# (the lr schedule depends on lr_decay_steps only); the last one goes to N.
BIG = 100_000
# dropout and 2 micro-batches: the resumed PRNG stream and accumulation must match too; a checkpoint
# at every eval, 3 kept besides the best, so that a damaged newest one leaves an older one to use.
RUN = ['--config.model.dropout=0.1', '--config.train.grad_accum_steps=2',
       f'--config.train.lr_decay_steps={N}', '--config.train.eval_interval=10',
       '--config.train.log_interval=1', '--config.checkpoint.save=always',
       '--config.checkpoint.keep_last=3', '--config.sample.eval_tokens=0']
RESUME = ['--config.train.resume=True']
LAST_GOOD = ['--config.train.resume_from_last_good=True']
NOISE = ('Traceback', 'Exception ignored', 'tensorstore_spec', 'Task was destroyed')


def _steps_and_evals(out_dir):
  """({step: train_loss} of the step logs, {step: (train_loss, val_loss)} of the evals); a step logged
  more than once (re-run after a resume from an older checkpoint) must have logged the same loss."""
  steps, evals = {}, {}
  for r in metrics(out_dir):
    if 'ms_per_step' in r:
      assert steps.setdefault(r['step'], r['train_loss']) == r['train_loss'], r
    elif 'val_loss' in r:
      value = (r['train_loss'], r['val_loss'])
      assert evals.setdefault(r['step'], value) == value, r
  return steps, evals


def _complete_steps(ckpt_dir):
  """Steps renamed into place by Orbax (a save cut short leaves only a temporary folder)."""
  return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) if ckpt_dir.is_dir() else []


def _newest(ckpt_dir):
  return _complete_steps(ckpt_dir)[-1]


def _files(path):
  return {p.relative_to(path): p.read_bytes() for p in path.rglob('*') if p.is_file()}


@pytest.mark.slow
def test_a_run_under_chaos_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
  seed = int(os.environ.get('GPT_JAX_CHAOS_SEED') or random.SystemRandom().randrange(1 << 32))
  rng, moments = random.Random(seed), []
  try:
    _chaos(tmp_path, rng, moments)
  except AssertionError as e:
    raise AssertionError(f'{e}\n\nchaos seed {seed} (replay: GPT_JAX_CHAOS_SEED={seed}); moments: '
                         + '; '.join(moments)) from None


def _chaos(tmp_path, rng, moments):
  from conftest import make_synthetic_text
  text = tmp_path / 'input.txt'
  text.write_text(make_synthetic_text(), encoding='utf-8')
  straight, chaos = tmp_path / 'straight', tmp_path / 'chaos'
  out, ckpt_dir = chaos / 'out', chaos / 'out' / 'checkpoints'
  args = train_flags(chaos, text, *RUN, f'--config.train.max_steps={BIG}')
  outputs = []  # (what, stdout + stderr) of every process, checked for noise at the end.

  def finish(run, what, expect_rc):
    rc, o, e = run.finish()
    outputs.append((what, o + e))
    assert rc == expect_rc, f'{what}: exit status {rc}, expected {expect_rc}\n{o}{e}'
    return o, e

  def resumed_from(o, what):
    m = re.findall(r'^resumed from step (\d+) in ', o, re.M)
    assert len(m) == 1, f'{what}: {o}'
    return int(m[0])

  def kill_at_a_step(run, start, what):
    """SIGKILL once the log shows a step a few (seeded) past `start`: mid-step, mid-eval or mid-save,
    in the background write of a checkpoint or not, wherever the run is when the signal lands."""
    k = start + rng.randint(2, 15)
    moments.append(f'{what}: SIGKILL after the log of step {k}')
    run.wait_for(rf'^step {k}: loss')
    run.proc.kill()
    return finish(run, what, -signal.SIGKILL)

  # 1. A fresh start, frozen (SIGSTOP) as soon as it holds the run directory, while a second run is
  #    started on it, which the lock refuses in one line. Meanwhile the reference, the same run
  #    uninterrupted, compiles the steps into the tests' compilation cache, where the others find them.
  reference = Run(train_flags(straight, text, *RUN, f'--config.train.max_steps={N}'))
  run = Run(args)
  run.wait_for(r'^JAX ')  # Printed once the lock is held.
  run.freeze()
  moments.append('segment 1: frozen while setting up; a second run started on its directory')
  o, e = finish(Run(args + RESUME), 'second run on the same directory', 1)
  errors = [l for l in e.splitlines() if l.strip()]
  assert len(errors) == 1 and errors[0].startswith(f'error: {out} is in use by another training run '
                                                   f'(pid {run.proc.pid} on host '), e
  assert 'model:' not in o  # Refused before loading anything.
  reference.wait_for(r'^compiled and ran the first step')
  run.thaw()
  kill_at_a_step(run, 0, 'segment 1')

  # 2. Resumed, and stopped by SIGTERM inside an eval or the save after it: once the log shows an
  #    eval's step, the run is frozen, and if what it printed stops short of 'saved checkpoint', the
  #    signal sent now must stop it at that very step (the stop is checked after the save). Else it is
  #    thawed and caught at the next eval.
  resume = RESUME if _complete_steps(ckpt_dir) else []  # Killed before its first save was complete:
  if not resume:                                       # an operator starts again, as the refusal says.
    moments.append('segment 1: killed before its first checkpoint was complete; segment 2 starts anew')
  run = Run(args + resume)
  start = resumed_from(run.wait_for(r'^resumed from step'), 'segment 2') if resume else 0
  eval_step = (start // 10 + rng.randint(3, 4)) * 10  # Three checkpoints at least before damage.
  for _ in range(5):
    run.wait_for(rf'^step {eval_step}: loss')
    printed = ''.join(run.freeze())
    if f'saved checkpoint {eval_step} ' not in printed:
      break
    moments.append(f'segment 2: frozen past the save of {eval_step}')
    run.thaw()
    eval_step += 10
  else:
    raise AssertionError('segment 2: five evals in a row were over before the run could be frozen')
  where = 'save' if f'step {eval_step}: train loss' in printed else 'eval'
  moments.append(f'segment 2: resumed at {start}, SIGTERM in the {where} of step {eval_step}')
  run.proc.send_signal(signal.SIGTERM)
  run.thaw()
  o, e = finish(run, 'segment 2', preemption.EX_TEMPFAIL)
  stop = re.findall(rf'^SIGTERM: stopped at step (\d+); checkpoint (\d+) is saved in {ckpt_dir}\. '
                    r'Resume with: (.*)$', e, re.M)
  assert len(stop) == 1 and stop[0][:2] == (str(eval_step),) * 2, e
  assert len(re.findall('^SIGTERM: stopping after the current step', e, re.M)) == 1, e
  assert re.search(rf'^step {eval_step}: train loss .*\n  saved checkpoint {eval_step} ', o, re.M), o
  assert metrics(out)[-1] == {'event': 'stopped', 'step': eval_step, 'signal': 'SIGTERM'}
  resume_cmd = shlex.split(stop[0][2])
  assert resume_cmd[1] == TRAIN and resume_cmd[-1] == '--config.train.resume=True', resume_cmd

  damaged = []  # (step, its files as damaged)

  def damage(how, what):
    step = _newest(ckpt_dir)
    how(ckpt_dir / str(step))
    moments.append(f'{what}: damaged checkpoint {step} ({how.__name__})')
    damaged.append((step, _files(ckpt_dir / str(step))))

  def set_aside_line(o, what):
    """The one line of a resume that set the damaged newest checkpoint aside; the step it resumed."""
    bad = damaged[-1][0]
    lines = re.findall(r'^moved damaged.*$', o, re.M)
    m = re.fullmatch(rf'moved damaged checkpoint {bad} to {out / checkpoint_damage.DAMAGED_DIR}; '
                     r'continuing from checkpoint (\d+)', lines[0]) if len(lines) == 1 else None
    assert m and int(m.group(1)) < bad, f'{what}: {o}'
    assert resumed_from(o, what) == int(m.group(1)), f'{what}: {o}'
    return int(m.group(1))

  # 3. The newest checkpoint loses half of an array file. The command the stop printed, asked to go on
  #    from the last good checkpoint, sets it aside in one line; killed. Then its newest checkpoint's
  #    metadata is garbled, and train.bin cut short.
  damage(truncate_largest_array, 'after segment 2')
  run = Run(None, cmd=[sys.executable, *resume_cmd[1:], *LAST_GOOD])
  run.wait_for(r'^resumed from step')
  good = set_aside_line(''.join(run.lines), 'segment 3')
  kill_at_a_step(run, good, 'segment 3')
  damage(garble_meta, 'after segment 3')
  train_bin = chaos / 'data' / 'train.bin'
  tokens = train_bin.read_bytes()
  os.truncate(train_bin, len(tokens) // 2)
  moments.append(f'after segment 3: train.bin cut to {len(tokens) // 2} of {len(tokens)} bytes')

  # 4. The last resume (to the end of the run) prepares the data again, sets the damaged checkpoint
  #    aside, and finishes.
  o, e = finish(Run(args[:-1] + [f'--config.train.max_steps={N}'] + RESUME + LAST_GOOD),
                'segment 4', 0)
  assert len(re.findall(rf'^re-preparing {chaos / "data"}: train\.bin has the wrong size '
                        r'\(truncated\?\)$', o, re.M)) == 1, o
  assert train_bin.read_bytes() == tokens
  set_aside_line(o, 'segment 4')
  assert f'done: step {N}, ' in o, o
  o, e = finish(reference, 'uninterrupted run', 0)

  # Every step and eval of the uninterrupted run, bit for bit, however often re-run; the same best
  # checkpoint, to the last bit of every parameter.
  steps, evals = _steps_and_evals(straight / 'out')
  assert sorted(steps) == list(range(1, N + 1)) and sorted(evals) == list(range(0, N + 1, 10))
  assert _steps_and_evals(out) == (steps, evals)
  _, pa, ma = checkpoint_lib.load_for_inference(str(straight / 'out'))
  _, pb, mb = checkpoint_lib.load_for_inference(str(out))
  assert (mb['step'], mb['val_loss']) == (ma['step'], ma['val_loss'])
  for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  # Nothing deleted: each damaged checkpoint is in damaged_checkpoints/, whole and as it was damaged.
  aside = out / checkpoint_damage.DAMAGED_DIR
  for step, files in damaged:
    copies = [p for p in aside.iterdir() if p.name == str(step) or p.name.startswith(f'{step}.')]
    assert any(_files(p) == files for p in copies), (step, sorted(p.name for p in aside.iterdir()))
  assert len(list(aside.iterdir())) == len(damaged)

  for what, printed in outputs:
    assert not [n for n in NOISE if n in printed], f'{what} printed noise:\n{printed}'
