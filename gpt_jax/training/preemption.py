"""Stopping a run cleanly on SIGTERM / SIGINT, with every process agreeing on the step.

Schedulers stop a job with SIGTERM and a grace period before SIGKILL (Slurm, Kubernetes, spot VMs); a
user stops it with Ctrl-C (SIGINT). `StopRequest` turns either signal into a flag that the training loop
reads between steps (between calls of train.steps_per_call steps): the step or call in flight (and an
eval in progress) finishes, the loop saves a checkpoint of that exact step, waits for Orbax to finalise
it and raises `Stopped`, which the scripts turn into exit status 75 (EX_TEMPFAIL from sysexits.h: "try
again later") and one line naming the resume command.

A second Ctrl-C stops at once (KeyboardInterrupt) without the checkpoint; a second SIGTERM changes
nothing, so that a scheduler repeating its signal cannot cut the checkpoint short.

Several processes: a signal may reach only one of them, yet all must leave the loop at the same step
(each one's checkpoint shards are part of one collective save). Every `SYNC_EVERY` steps, and after each
eval, the processes all-gather their flags and stop if any is set. Each agreement waits for the steps
queued before it, so it is not done every step; one process runs with no sync at all.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from typing import Optional

from gpt_jax.errors import Stopped  # Raised by the loop; the scripts exit with its status.
from gpt_jax.parallel import distributed

EX_TEMPFAIL = Stopped.exit_status  # 75: stopped by a signal after saving a resumable checkpoint.
# Multi-process runs: steps between agreements on stopping. Each agreement waits for the steps queued
# before it; the CPU loop waits for every 8th step anyway (run_setup.CPU_MAX_STEPS_IN_FLIGHT), and on a
# GPU one drained queue per 8 steps costs at most one step's dispatch time.
SYNC_EVERY = 8
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """Context manager: while active, SIGTERM and SIGINT set a flag instead of killing the process.

  `should_stop(step, after_eval)` is the loop's question "leave now?", the same answer on every process.
  Outside the main thread (where Python cannot install handlers) it stays inert and never stops.
  """

  def __init__(self) -> None:
    self.signal_name: Optional[str] = None  # The first signal received ('SIGTERM' / 'SIGINT').
    self._previous: dict[int, object] = {}
    self._multi = False

  def __enter__(self) -> 'StopRequest':
    self._multi = distributed.process_count() > 1
    if threading.current_thread() is threading.main_thread():
      for sig in _SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame) -> None:
    name = signal.Signals(signum).name
    if self.signal_name is None:
      self.signal_name = name
      # os.write, not print: a handler may run in the middle of another print to the same stream.
      again = ' (Ctrl-C again to stop at once, without it)' if signum == signal.SIGINT else ''
      os.write(sys.stderr.fileno(), f'\n{name}: stopping after the current step and saving a '
                                    f'checkpoint{again}\n'.encode())
    elif signum == signal.SIGINT:
      raise KeyboardInterrupt

  @property
  def requested(self) -> bool:
    """This process received a signal (whether or not the others know yet)."""
    return self.signal_name is not None

  def should_stop(self, step: int, after_eval: bool = False, steps_per_call: int = 1) -> bool:
    """True when the run should stop before training step `step` + 1, on every process alike.

    One process: the local flag. Several: all-gathered after evals and after the call of steps that
    passed a multiple of `SYNC_EVERY` (points every process reaches at the same step), else False.
    With steps_per_call = k the loop asks only at multiples of k: those within k steps past one.
    """
    if not self._multi:
      return self.requested
    if step % SYNC_EVERY >= steps_per_call and not after_eval:
      return False
    return distributed.any_process(self.requested)


def resume_command(argv: Optional[list[str]] = None) -> str:
  """The command that continues this run: the script's own command line with train.resume=True.

  Outside scripts/train.py (e.g. a library call) only the flag to add can be named.
  """
  argv = list(sys.argv if argv is None else argv)
  if not argv or not os.path.basename(argv[0]).startswith('train'):
    return 'the same command with --config.train.resume=True'
  args = [a for a in argv[1:] if not a.lstrip('-').startswith(('config.train.resume=',
                                                                'noconfig.train.resume'))
          and a.lstrip('-') != 'config.train.resume']
  return shlex.join(['python', argv[0], *args, '--config.train.resume=True'])


def stopped_message(why: str, step: int, latest: Optional[int], directory: str) -> str:
  """What a run stopped by `why` (a signal) says: where its checkpoint is, and how to resume."""
  return f'{why}: stopped at step {step}; ' + (
      f'checkpoint {latest} is saved in {directory}. Resume with: '
      f'{resume_command()}' if latest is not None else
      'no checkpoint was written yet: start the run again with the same command.')


def interrupted_message(step: int, latest: Optional[int]) -> str:
  """What a run stopped at once (a second Ctrl-C, no checkpoint of this step) says."""
  return f'interrupted at step {step}. ' + (
      f'Continue from checkpoint {latest} with --config.train.resume=True.' if latest is not None
      else 'No checkpoint was written yet.')
